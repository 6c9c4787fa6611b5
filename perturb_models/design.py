"""Choose the next screen: which knockdowns to measure next, given a trained model and a pool of candidates.

Strategies (pure functions over arrays; ``select_batch`` dispatches):

- ``random``: a seeded uniform draw from the pool.
- ``uncertainty``: the candidates whose predicted responses the model is least sure of: the mean, over the
  target genes, of the entropy (bits) of the model's class distribution for the pair. For a ``joint`` model
  that is the 3-class entropy (not DE / down / up) = ``H(p_de) + p_de * H(p_up_given_de)``; for ``de`` the
  entropy of ``p_de``; for ``dir`` that of ``p_up_given_de``. The model's own scores (what ``evaluate.py``
  writes), not the calibrated ones, so the command ranks as the retrospective simulation did.
- ``coverage``: knowledge coverage, farthest-first over GO similarity: a candidate's coverage is its
  largest GO Jaccard similarity to a measured knockdown (the similarity the knn's retrieval graph is built
  from, over the same GO term sets); the least covered candidate is picked, counts as measured, and the
  coverage of the rest is updated. Ties (e.g. every candidate with nothing similar measured) go to the
  candidate most similar in total to the rest of the pool (it covers most), then to the pool order. A
  candidate without GO annotation covers nothing: it comes after every annotated one.
- ``representative``: knowledge coverage of the pool (greedy facility location over the same GO
  similarity): each pick is the candidate that most raises ``sum_j max similarity(j, measured)`` over the
  unmeasured candidates ``j`` (a pick covers itself fully), similarities kept to each candidate's
  ``top_k`` (100) most similar candidates, as the knn's retrieval graph keeps them. Farthest-first
  reaches for the outliers of GO space; this reaches for what stands for many candidates.
- ``mix``: the same greedy loop on ``weight * u + (1 - weight) * (1 - coverage)``, where ``u`` is the
  candidate's uncertainty as a percentile rank in the pool (0..1); ``weight=0`` is ``coverage`` and
  ``weight=1`` ranks as ``uncertainty``.

``design(cfg)`` is the command (``python design.py``, conf/design.yaml): the checkpoint and the query are
resolved as ``predict.py`` resolves them (``perturb_models.prediction``); the proposal is written to
``proposal.csv`` and ``design.json`` in the run folder. The retrospective simulation that compares the
strategies (``benchmarks/design.py``) refits a knn on growing subsets of the training knockdowns with
``restrict_context`` / ``refit_encoder`` / ``score_stage``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from scipy import sparse

from perturb_models.config import plain
from perturb_models.console import say
from perturb_models.errors import ConfigError, UserError

log = logging.getLogger(__name__)

STRATEGIES = ("random", "uncertainty", "coverage", "mix", "representative")
NEEDS_MODEL = {"uncertainty", "mix"}


class DesignError(UserError, ValueError):
    """The design request cannot be answered (unknown strategy, bad size, empty pool)."""


def check_request(strategy: str, size: int, weight: float = 0.5) -> None:
    """One-line errors for a strategy name, a batch size or a mix weight that cannot be used."""
    if strategy not in STRATEGIES:
        raise DesignError(f"strategy={strategy}: unknown; choose one of {', '.join(STRATEGIES)}")
    if int(size) < 1:
        raise DesignError(f"size={size}: the number of knockdowns to propose must be a positive number")
    if not 0.0 <= float(weight) <= 1.0:
        raise DesignError(f"weight={weight}: the mix weight of uncertainty must be in [0, 1]")


# ---- uncertainty ------------------------------------------------------------------------------------


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli(p), 0 at p in {0, 1}."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    out = np.zeros_like(p)
    inner = (p > 0) & (p < 1)
    q = p[inner]
    out[inner] = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    return out


def pair_entropy(scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per pair, the entropy (bits) of the model's class distribution from its decoded scores: ``de`` and
    ``dir`` (joint: 3 classes, chain rule), ``de`` alone, or ``dir`` alone."""
    if "de" in scores and "dir" in scores:
        p_de = np.asarray(scores["de"], dtype=np.float64)
        return binary_entropy(p_de) + p_de * binary_entropy(scores["dir"])
    if "de" in scores:
        return binary_entropy(scores["de"])
    return binary_entropy(scores["dir"])


def mean_entropy(scores: Mapping[str, np.ndarray], n_perts: int, n_genes: int) -> np.ndarray:
    """Per perturbation, the mean pair entropy over its ``n_genes`` targets (pairs in pert-major order)."""
    return pair_entropy(scores).reshape(n_perts, n_genes).mean(axis=1)


@torch.no_grad()
def encoder_scores(
    encoder, task: str, pert_idx: np.ndarray, gene_idx: np.ndarray, batch_size: int = 8192
) -> dict[str, np.ndarray]:
    """Decoded scores of each pair as the classifier's test loop computes them (``decode_logits``, float64),
    for an encoder that produces logits (knn) or a whole classifier."""
    from perturb_models.tasks import decode_logits

    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(pert_idx), batch_size):
        batch = {
            "pert": torch.as_tensor(pert_idx[start : start + batch_size], dtype=torch.long),
            "gene": torch.as_tensor(gene_idx[start : start + batch_size], dtype=torch.long),
        }
        for key, value in decode_logits(encoder(batch).float(), task).items():
            out.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(parts) for key, parts in out.items()}


def pool_uncertainty(
    score_fn: Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]],
    pert_idx: np.ndarray,
    gene_idx: np.ndarray,
    chunk_pairs: int = 500_000,
) -> np.ndarray:
    """Mean entropy per candidate (``pert_idx``) over the targets (``gene_idx``), scored in chunks."""
    pert_idx, gene_idx = np.asarray(pert_idx), np.asarray(gene_idx)
    per_chunk = max(1, chunk_pairs // max(1, len(gene_idx)))
    parts = []
    for start in range(0, len(pert_idx), per_chunk):
        chunk = pert_idx[start : start + per_chunk]
        scores = score_fn(np.repeat(chunk, len(gene_idx)), np.tile(gene_idx, len(chunk)))
        parts.append(mean_entropy(scores, len(chunk), len(gene_idx)))
    return np.concatenate(parts) if parts else np.zeros(0)


# ---- knowledge coverage -----------------------------------------------------------------------------


class GOSimilarity:
    """GO Jaccard similarity between items (knockdowns), from one GO term set per item (None: no annotation).

    The same measure as the knn's retrieval graph (``knowledge.graphs.go_similarity_graph``), computed on
    demand (one item against many) instead of as a top-k graph.
    """

    def __init__(self, term_sets: Sequence[frozenset[str] | None]):
        from perturb_models.knowledge.graphs import _incidence

        matrix, _ = _incidence(list(term_sets))
        self.matrix = matrix.tocsr().astype(np.float32)
        self.matrix.data[:] = 1.0
        self.sizes = np.asarray(self.matrix.sum(axis=1)).ravel()
        self.annotated = self.sizes > 0

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Dense Jaccard similarities of ``rows`` x ``cols`` (0 where either has no annotation)."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        inter = np.asarray((self.matrix[rows] @ self.matrix[cols].T).todense(), dtype=np.float64)
        union = self.sizes[rows][:, None] + self.sizes[cols][None, :] - inter
        return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

    def max_to(self, rows: np.ndarray, cols: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the largest similarity to any of ``cols`` and which col (-1 when ``cols`` is empty)."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        best, which = np.zeros(len(rows)), np.full(len(rows), -1, dtype=np.int64)
        if len(cols) == 0:
            return best, which
        for start in range(0, len(rows), chunk):
            sims = self.block(rows[start : start + chunk], cols)
            at = sims.argmax(axis=1)
            best[start : start + chunk] = sims[np.arange(len(at)), at]
            which[start : start + chunk] = cols[at]
        return best, which

    def total_to(self, rows: np.ndarray, cols: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Per row: the summed similarity to ``cols`` (itself excluded)."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        total = np.zeros(len(rows))
        for start in range(0, len(rows), chunk):
            block_rows = rows[start : start + chunk]
            sims = self.block(block_rows, cols)
            sims[block_rows[:, None] == cols[None, :]] = 0.0
            total[start : start + chunk] = sims.sum(axis=1)
        return total


# ---- strategies -------------------------------------------------------------------------------------


def pick_random(n_pool: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` distinct positions of the pool, drawn uniformly (seeded through ``rng``)."""
    return np.sort(rng.choice(n_pool, size=min(size, n_pool), replace=False)) if n_pool else np.zeros(0, np.int64)


def pick_uncertainty(uncertainty: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` positions of highest uncertainty, highest first (ties: pool order)."""
    order = np.argsort(-np.asarray(uncertainty, dtype=np.float64), kind="stable")
    return order[:size]


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Rank of each value in [0, 1] (1 = highest; ties share their mean rank)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) <= 1:
        return np.ones(len(values))
    return (pd.Series(values).rank(method="average").to_numpy() - 1.0) / (len(values) - 1.0)


def pick_farthest_first(
    similarity: GOSimilarity,
    pool: np.ndarray,
    measured: np.ndarray,
    size: int,
    uncertainty: np.ndarray | None = None,
    weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy farthest-first: ``size`` positions of ``pool`` (item indices of ``similarity``), each the
    candidate of highest ``weight * u + (1 - weight) * (1 - coverage)``, where coverage is its largest
    similarity to the measured items and to the candidates already picked, and ``u`` the percentile rank
    of ``uncertainty`` (needed when ``weight > 0``). A candidate without annotation has coverage 1 (it
    covers nothing). Ties: larger total similarity to the pool, then pool order.

    Returns ``(positions in pick order, coverage of each pick when it was picked)``.
    """
    pool, measured = np.asarray(pool, dtype=np.int64), np.asarray(measured, dtype=np.int64)
    size = min(int(size), len(pool))
    if weight > 0 and uncertainty is None:
        raise ValueError("a mix weight > 0 needs the candidates' uncertainty")
    coverage, _ = similarity.max_to(pool, measured)
    annotated = similarity.annotated[pool]
    coverage[~annotated] = 1.0
    spread = similarity.total_to(pool, pool)
    u = percentile_rank(uncertainty) if weight > 0 else np.zeros(len(pool))
    free = np.ones(len(pool), dtype=bool)
    picks, picked_coverage = [], []
    for _ in range(size):
        gain = weight * u + (1.0 - weight) * (1.0 - coverage)
        gain = np.where(free, gain, -np.inf)
        best = gain.max()
        tied = np.flatnonzero(free & np.isclose(gain, best, rtol=0.0, atol=1e-12))
        choice = int(tied[np.argmax(spread[tied])])  # argmax: the first of equal spreads (pool order)
        picks.append(choice)
        picked_coverage.append(coverage[choice] if annotated[choice] else 0.0)
        free[choice] = False
        if annotated[choice]:
            coverage = np.maximum(coverage, similarity.block(pool, pool[[choice]])[:, 0])
            coverage[~annotated] = 1.0
    return np.asarray(picks, dtype=np.int64), np.asarray(picked_coverage)


def pick_representative(
    similarity: GOSimilarity, pool: np.ndarray, measured: np.ndarray, size: int, top_k: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy facility location: ``size`` positions of ``pool``, each the candidate whose pick most raises
    the summed coverage of the unmeasured pool (coverage of a candidate: its largest similarity to a
    measured item or a pick; 1 for a pick itself); similarities among candidates kept to each candidate's
    ``top_k`` most similar. Ties: pool order. Returns ``(positions in pick order, gain of each pick)``."""
    from perturb_models.knowledge.graphs import topk_similarity_edges

    pool, measured = np.asarray(pool, dtype=np.int64), np.asarray(measured, dtype=np.int64)
    size, n = min(int(size), len(pool)), len(pool)
    coverage, _ = similarity.max_to(pool, measured)
    position = np.full(len(similarity), -1, dtype=np.int64)
    position[pool] = np.arange(n)
    src, dst, sim = topk_similarity_edges(
        similarity.matrix, top_k, 0.0, "jaccard", rows=pool, candidates=pool, desc="GO Jaccard (pool)"
    )
    # rows: the candidate to cover; columns: the candidate that would cover it (itself included, at 1).
    rows = np.concatenate([position[dst], np.arange(n)])
    cols = np.concatenate([position[src], np.arange(n)])
    values = np.concatenate([sim.astype(np.float64), np.ones(n)])
    matrix = sparse.csr_matrix((values, (rows, cols)), shape=(n, n))
    matrix.sum_duplicates()
    by_column = matrix.tocsc()
    row_of = np.repeat(np.arange(n), np.diff(matrix.indptr))
    free = np.ones(n, dtype=bool)
    picks, gains = [], []
    for _ in range(size):
        gain = np.bincount(matrix.indices, weights=np.maximum(matrix.data - coverage[row_of], 0.0), minlength=n)
        gain = np.where(free, gain, -np.inf)
        choice = int(np.argmax(gain))
        picks.append(choice)
        gains.append(float(gain[choice]))
        free[choice] = False
        s, e = by_column.indptr[choice], by_column.indptr[choice + 1]
        covered = by_column.indices[s:e]
        coverage[covered] = np.maximum(coverage[covered], by_column.data[s:e])
    return np.asarray(picks, dtype=np.int64), np.asarray(gains)


def select_batch(
    strategy: str,
    size: int,
    pool: np.ndarray,
    measured: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    uncertainty: np.ndarray | None = None,
    similarity: GOSimilarity | None = None,
    weight: float = 0.5,
) -> np.ndarray:
    """Positions (into ``pool``) of the next batch by ``strategy``: distinct, at most ``size``, and never
    an item of ``measured`` (``pool`` and ``measured`` are item indices; measured items in the pool are
    skipped)."""
    check_request(strategy, size, weight)
    pool, measured = np.asarray(pool, dtype=np.int64), np.asarray(measured, dtype=np.int64)
    open_ = np.flatnonzero(~np.isin(pool, measured))
    if len(open_) == 0:
        raise DesignError("the pool of candidates is empty (every candidate is measured already)")
    if strategy == "random":
        chosen = pick_random(len(open_), size, rng if rng is not None else np.random.default_rng(0))
    elif strategy == "uncertainty":
        if uncertainty is None:
            raise ValueError("strategy=uncertainty needs the candidates' uncertainty")
        chosen = pick_uncertainty(np.asarray(uncertainty)[open_], size)
    elif strategy == "representative":
        if similarity is None:
            raise ValueError("strategy=representative needs GO similarities")
        chosen, _ = pick_representative(similarity, pool[open_], measured, size)
    else:
        if similarity is None:
            raise ValueError(f"strategy={strategy} needs GO similarities")
        u = np.asarray(uncertainty)[open_] if strategy == "mix" else None
        chosen, _ = pick_farthest_first(
            similarity, pool[open_], measured, size, u, weight=float(weight) if strategy == "mix" else 0.0
        )
    return open_[chosen]


# ---- refits on a subset of the training knockdowns (the retrospective simulation) --------------------


def restrict_context(context, perts: Sequence[str]):
    """The ``DataContext`` a run would have had if only ``perts`` (training perturbations) were measured:
    training pairs and perturbations cut to them; vocabulary, validation and test unchanged."""
    keep = set(perts)
    unknown = keep - set(context.train_perts)
    if unknown:
        raise ValueError(f"{len(unknown)} perturbations are not training perturbations, e.g. {sorted(unknown)[0]}")
    pairs = context.train_pairs.loc[context.train_pairs["pert"].isin(keep)].reset_index(drop=True)
    return replace(context, train_pairs=pairs, train_perts=tuple(sorted(keep)))


def refit_encoder(encoder_cfg, context, cache_graphs: bool = False):
    """The model config's encoder built over ``context`` (knn: nothing to train, the build is the fit).
    Graphs of a subset are not written to the graph cache unless ``cache_graphs``."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.create(OmegaConf.to_container(encoder_cfg, resolve=True))
    if not cache_graphs and "graphs" in cfg:
        with open_dict(cfg):
            for spec in cfg.graphs.values():
                spec.cache = False
    encoder = instantiate(cfg, _partial_=True, _convert_="all")(context=context)
    encoder.eval()
    return encoder


def score_stage(encoder, datamodule, stage: str, batch_size: int = 8192) -> dict[str, float]:
    """``{task}_auroc_per_gene`` and ``{task}_genes_scored`` of ``stage`` (val / test), as the classifier's
    epoch end computes them."""
    from perturb_models.metrics import metrics_from_predictions, prediction_frame

    tensors = datamodule.splits[stage].tensors
    pert, gene = tensors["pert"].numpy(), tensors["gene"].numpy()
    scores = encoder_scores(encoder, datamodule.context.task, pert, gene, batch_size)
    vocab = datamodule.context.vocab
    frame = prediction_frame(
        vocab.decode(pert.tolist()), vocab.decode(gene.tolist()), tensors["de"].numpy(), tensors["dir"].numpy(), scores
    )
    metrics = metrics_from_predictions(frame, stage)
    return {
        key.split("/", 1)[1]: value
        for key, value in metrics.items()
        if key.endswith(("auroc_per_gene", "genes_scored"))
    }


def go_term_sets(
    symbols: Sequence[str],
    graph_specs: Mapping[str, Any] | None,
    knowledge_root: str | None,
    allow_download: bool,
    context=None,
) -> list[frozenset[str] | None]:
    """GO term sets per symbol, read as the model's ``go`` graph spec reads them (aspects, excluded evidence,
    propagation), else as conf/graph/go.yaml's defaults (evidence ND excluded). With ``context`` (a
    training vocabulary), the graph builder's own reader (gene clusters included)."""
    spec: dict[str, Any] = {"exclude_evidence": ("ND",)}
    for candidate in (graph_specs or {}).values():
        if candidate.get("kind") == "go":
            spec = dict(candidate)
            break
    params = {
        "annotations": spec.get("annotations", "gene2go"),
        "aspects": spec.get("aspects"),
        "exclude_evidence": tuple(spec.get("exclude_evidence") or ()),
        "propagate": bool(spec.get("propagate", False)),
        "relations": tuple(spec.get("relations") or ("is_a", "part_of")),
    }
    root = knowledge_root if knowledge_root is not None else spec.get("knowledge_root")
    if context is not None:
        from perturb_models.knowledge.graphs import vocab_term_sets

        sets, _ = vocab_term_sets(
            context,
            root,
            cluster_min_share=float(spec.get("cluster_min_share", 0.1)),
            allow_download=allow_download,
            **params,
        )
        index = {s: i for i, s in enumerate(context.vocab.symbols)}
        return [sets[index[s]] for s in symbols]
    from perturb_models.knowledge.annotations import symbol_go_terms

    terms, _ = symbol_go_terms(list(symbols), root, allow_download=allow_download, **params)
    return [terms.get(s) for s in symbols]


# ---- the command ------------------------------------------------------------------------------------


def _symbols_option(value, option: str):
    from perturb_models.prediction import asked_symbols

    asked = asked_symbols(value, option)
    if asked is None:
        return None
    return asked


def design(cfg: DictConfig) -> pd.DataFrame:
    """Propose the next batch of knockdowns (conf/design.yaml); writes ``proposal.csv`` and ``design.json``."""
    from perturb_models.data.vocab import GeneVocab
    from perturb_models.io import atomic_write_dataframe, atomic_write_json
    from perturb_models.prediction import ALL_KNOWN, QueryResolver, _load, measured_downstream_genes

    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    strategy, size, weight = str(cfg.get("strategy")), cfg.get("size"), cfg.get("weight")
    if size is None or weight is None:
        raise ConfigError("size and weight must be numbers")
    check_request(strategy, int(size), float(weight))
    size, weight = int(size), float(weight)
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is missing: pass ckpt_path=RUN_DIR (a train.py run folder) or a .ckpt file")
    pool_asked = _symbols_option(cfg.get("perts"), "perts")
    if pool_asked is None:
        raise ConfigError("perts is missing: the pool of candidates, perts=[GENE,...], perts=FILE or perts=all_known")
    measured_asked = _symbols_option(cfg.get("measured"), "measured") or []
    genes_asked = _symbols_option(cfg.get("genes"), "genes")
    if int(cfg.get("batch_size")) < 1:
        raise ConfigError(f"batch_size={cfg.get('batch_size')}: must be a positive number")

    ckpt_file, record, run_cfg, datamodule, model = _load(cfg)
    encoder, context = model.encoder, datamodule.context
    knowledge = run_cfg.get("knowledge") or {}
    knowledge_root = cfg.get("knowledge_root") or knowledge.get("root")
    allow_download = bool(knowledge.get("allow_download", True))
    resolver = QueryResolver(
        context.vocab, measured_downstream_genes(datamodule), knowledge_root, allow_download, context.ensembl_ids
    )

    # What is measured already: every knockdown of the checkpoint's dataset, plus those named by `measured`.
    dataset_perts = list(dict.fromkeys([*context.train_perts, *context.val_perts, *context.test_perts]))
    extra_measured = [r for r in (resolver.perturbation(s) for s in measured_asked)]
    for item in extra_measured:
        if item.refused:
            say(f"refused measured {item.refused}", level=logging.WARNING)
    measured = list(dict.fromkeys(dataset_perts + [r.symbol for r in extra_measured if r.refused is None]))
    measured_set = set(measured)

    pool_list = resolver.all_known() if pool_asked == ALL_KNOWN else pool_asked
    resolved = [resolver.perturbation(s) for s in pool_list]
    if strategy in NEEDS_MODEL and not encoder.describes_new_perturbations:
        why = encoder.new_perturbation_refusal
        for item in resolved:
            if item.refused is None and not item.in_training_vocab:
                item.refused = (
                    f"{item.asked} ({item.symbol}) is not in the training vocabulary; strategy={strategy} "
                    f"needs the model's predictions and this model cannot describe it: {why}"
                )
    refused = [r for r in resolved if r.refused]
    if pool_asked != ALL_KNOWN or len(refused) <= 20:
        for item in refused:
            say(f"refused pert {item.refused}", level=logging.WARNING)
    else:
        say(f"refused {len(refused)} symbols (listed in design.json)", level=logging.WARNING)
    answered = list(dict.fromkeys(r.symbol for r in resolved if r.refused is None))
    already = [s for s in answered if s in measured_set]
    pool = [s for s in answered if s not in measured_set]
    if already:
        say(f"{len(already)} candidates are measured already (in the checkpoint's dataset or `measured`): left out")
    if not pool:
        raise DesignError(
            f"the pool of candidates is empty: {len(pool_list)} asked, {len(refused)} refused, "
            f"{len(already)} measured already"
        )

    # One index space: the measured knockdowns, then the pool.
    items = measured + pool
    measured_idx = np.arange(len(measured))
    uncertainty = None
    scoring_seconds = 0.0
    if strategy in NEEDS_MODEL:
        new = [s for s in pool if s not in context.vocab]
        vocab = GeneVocab(context.vocab.symbols + new)
        if new:
            encoder.extend_vocabulary(replace(context, vocab=vocab))
            model.vocab = vocab
        genes = resolver_genes(resolver, genes_asked)
        device = torch.device(cfg.get("device") or "cpu")
        model.to(device)
        say(
            f"scoring {len(pool) * len(genes):,} pairs ({len(pool):,} candidates x {len(genes):,} target genes) with "
            f"{run_cfg.model.get('name')} from {ckpt_file}"
        )
        began = time.perf_counter()
        from perturb_models.prediction import score_pairs

        def score_fn(p, g):
            return score_pairs(model, p, g, int(cfg.batch_size), device)

        uncertainty = pool_uncertainty(score_fn, vocab.encode(pool), vocab.encode(genes), int(cfg.chunk_pairs))
        scoring_seconds = time.perf_counter() - began
    else:
        genes = []
    graph_specs = plain(run_cfg.model.get("encoder", {}).get("graphs"))
    similarity = GOSimilarity(go_term_sets(items, graph_specs, knowledge_root, allow_download))
    full_u = None if uncertainty is None else np.concatenate([np.zeros(len(measured)), uncertainty])
    rng = np.random.default_rng(int(cfg.seed))
    chosen = select_batch(
        strategy,
        size,
        np.arange(len(items)),
        measured_idx,
        rng=rng,
        uncertainty=full_u,
        similarity=similarity,
        weight=weight,
    )
    picked = chosen  # item indices: the pool given to select_batch is every item, the measured ones skipped
    # Coverage of each pick at its turn (measured plus the picks before it), and its closest measured knockdown.
    coverage_then, closest_then = [], []
    so_far = list(measured_idx)
    for item in picked:
        best, which = similarity.max_to(np.array([item]), np.array(so_far))
        coverage_then.append(float(best[0]) if similarity.annotated[item] else np.nan)
        closest_then.append(items[which[0]] if which[0] >= 0 and best[0] > 0 else "")
        so_far.append(item)
    coverage_now, closest_now = similarity.max_to(picked, measured_idx)
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(picked) + 1),
            "pert": [items[i] for i in picked],
            "strategy": strategy,
            "mean_entropy_bits": uncertainty[picked - len(measured)] if uncertainty is not None else np.nan,
            "entropy_percentile": percentile_rank(uncertainty)[picked - len(measured)]
            if uncertainty is not None
            else np.nan,
            "go_similarity_to_measured": np.where(similarity.annotated[picked], coverage_now, np.nan),
            "closest_measured": [items[w] if w >= 0 and c > 0 else "" for w, c in zip(closest_now, coverage_now)],
            "go_similarity_at_pick": coverage_then,
            "closest_at_pick": closest_then,
            "go_annotated": similarity.annotated[picked],
            "in_training_vocab": [items[i] in context.vocab for i in picked],
        }
    )
    atomic_write_dataframe(output_dir / "proposal.csv", frame)
    summary = {
        "checkpoint": str(ckpt_file),
        "model": run_cfg.model.get("name"),
        "dataset": context.dataset,
        "task": context.task,
        "strategy": strategy,
        "size": size,
        "weight": weight if strategy == "mix" else None,
        "seed": int(cfg.seed) if strategy == "random" else None,
        "uncertainty": (
            "mean over the target genes of the entropy (bits) of the model's class distribution "
            "(joint: not DE / down / up) from its uncalibrated scores"
        )
        if uncertainty is not None
        else None,
        "coverage": "largest GO Jaccard similarity to a measured knockdown (same GO term sets as the model's go graph)",
        "target_genes": len(genes),
        "pool_asked": pool_asked if pool_asked == ALL_KNOWN else list(pool_asked),
        "pool": len(pool),
        "measured": len(measured),
        "measured_extra": [r.symbol for r in extra_measured if r.refused is None],
        "left_out_measured_already": already,
        "refused": [{"asked": r.asked, "reason": r.refused} for r in refused],
        "proposed": frame["pert"].tolist(),
        "scoring_seconds": round(scoring_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(output_dir / "design.json", summary)
    say(summary_text(frame, summary))
    return frame


def resolver_genes(resolver, genes_asked) -> list[str]:
    """Target genes for the uncertainty: every measured downstream gene, or those asked (resolved as predict.py)."""
    from perturb_models.prediction import QueryError

    if genes_asked is None:
        return sorted(resolver.measured)
    genes = [resolver.gene(s) for s in genes_asked]
    for item in genes:
        if item.refused:
            say(f"refused gene {item.refused}", level=logging.WARNING)
    answered = list(dict.fromkeys(g.symbol for g in genes if g.refused is None))
    if not answered:
        raise QueryError(f"no target gene can be scored ({len(genes)} asked); the first: {genes[0].refused}")
    return answered


def summary_text(frame: pd.DataFrame, summary: Mapping[str, Any], shown: int = 10) -> str:
    """The console summary: what was chosen from what, and the first picks with their scores."""
    head = (
        f"next screen: {len(frame)} of {summary['pool']:,} candidates by {summary['strategy']}"
        + (f" (weight {summary['weight']})" if summary.get("weight") is not None else "")
        + f"; {summary['measured']:,} knockdowns measured already ({summary['dataset']}, {summary['model']})"
    )
    lines = [head, f"{'rank':>4}  {'pert':<12} {'entropy':>8} {'GO sim':>7}  closest measured"]
    for row in frame.head(shown).itertuples():
        entropy = "" if pd.isna(row.mean_entropy_bits) else f"{row.mean_entropy_bits:.3f}"
        sim = "no GO" if pd.isna(row.go_similarity_to_measured) else f"{row.go_similarity_to_measured:.3f}"
        lines.append(f"{row.rank:>4}  {row.pert:<12} {entropy:>8} {sim:>7}  {row.closest_measured}")
    if len(frame) > shown:
        lines.append(f"... {len(frame) - shown} more in proposal.csv")
    lines.append("written: proposal.csv (rank, pert, mean_entropy_bits, go_similarity_to_measured, ...), design.json")
    return "\n".join(lines)
