"""``predict(cfg)``: ask a trained model about knockdowns, measured or not (``python predict.py``).

A query names perturbed genes (``perts``) and downstream genes (``genes``). The checkpoint's data and
model are rebuilt from its own record (as ``evaluate.py`` does); a perturbed gene outside the training
vocabulary is appended after it (the first N symbols keep their indices) and the encoder gives it its
inputs from the knowledge files (``Encoder.extend_vocabulary``), leaving what every known gene sees
unchanged. So the answers for known perturbations are the ones ``evaluate.py`` gives, bit for bit, whatever
else is asked in the same call. Downstream genes must be genes the model was trained to score: the
downstream genes measured in the checkpoint's dataset.

Symbols resolve as typed: the training vocabulary first, then gene_info (official symbol, Ensembl id,
synonym, hyphen-less form, case; ``SymbolResolver.resolve_query``). Probabilities go through the
checkpoint's calibrators (``perturb_models.calibration``) when it has them; the model's own scores are
then kept as ``*_uncalibrated`` columns. Outputs, in the run folder:
``predictions.csv`` (one row per pair), ``query.json`` (what was asked, how each symbol resolved, what
was refused and why) and a console summary per perturbation.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from perturb_models.calibration import apply_calibrator
from perturb_models.console import say
from perturb_models.data.vocab import GeneVocab
from perturb_models.errors import ConfigError, UserError
from perturb_models.io import atomic_write_dataframe, atomic_write_json, atomic_write_text
from perturb_models.tasks import decode_logits

log = logging.getLogger(__name__)

ALL_KNOWN = "all_known"
"""``perts=all_known``: every gene with a GO annotation in the knowledge files (an in-silico screen)."""


class QueryError(UserError, ValueError):
    """Nothing answerable was asked (every symbol refused, an empty list, an unreadable file)."""


@dataclass
class Resolved:
    """One asked symbol: the vocabulary symbol it became (``symbol``), whether the model was trained with
    it (``in_training_vocab``), how it resolved, what knowledge describes it, or why it was refused."""

    asked: str
    role: str  # "pert" or "gene"
    symbol: str | None = None
    in_training_vocab: bool = False
    resolved_by: str | None = None
    knowledge: str | None = None  # go | none | unknown (perturbations only; see knowledge_flags)
    refused: str | None = None


# ---- what was asked ---------------------------------------------------------------------------------


def read_symbol_file(path: Path) -> list[str]:
    """Symbols from a text file: one or more per line (separated by commas, tabs or spaces); ``#`` comments."""
    symbols: list[str] = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0]
        symbols.extend(s for s in line.replace(",", " ").split() if s)
    if not symbols:
        raise QueryError(f"{path}: no gene symbol in the file")
    return symbols


def asked_symbols(value: Any, option: str) -> list[str] | str | None:
    """``perts=`` / ``genes=`` as given: a list, a file of symbols, ``all_known`` (perts), one symbol, or null."""
    if value is None:
        return None
    if isinstance(value, (ListConfig, list, tuple)):
        symbols = [str(v).strip() for v in value if str(v).strip()]
        if not symbols:
            raise QueryError(f"{option}=[]: the list is empty")
        return list(dict.fromkeys(symbols))
    text = str(value).strip()
    if option == "perts" and text == ALL_KNOWN:
        return ALL_KNOWN
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return list(dict.fromkeys(read_symbol_file(path)))
    if "/" in text or text.endswith((".txt", ".csv", ".tsv")):
        raise QueryError(f"{option}={text}: no such file")
    return [text]


# ---- resolution -------------------------------------------------------------------------------------


class QueryResolver:
    """Turns typed symbols into vocabulary symbols of a checkpoint (see the module docstring): a query
    written with another name of a known gene finds it through the GeneID training-time knowledge gave it."""

    def __init__(
        self,
        vocab: GeneVocab,
        measured_genes: Sequence[str],
        knowledge_root: str | None,
        allow_download: bool,
        ensembl_ids: Mapping[str, str] | None = None,
    ):
        self.vocab = vocab
        self.ensembl_ids = dict(ensembl_ids or {})
        self.measured = set(measured_genes)
        self.knowledge_root, self.allow_download = knowledge_root, allow_download
        self._gene_info = None
        self._vocab_symbol_of: dict[int, str] | None = None

    # gene_info is read only when a symbol is not in the training vocabulary: a query of known genes runs
    # without knowledge files (for models that use none, like mlp).
    @property
    def gene_info(self):
        if self._gene_info is None:
            from perturb_models.knowledge.files import knowledge_file
            from perturb_models.knowledge.gene_info import SymbolResolver, read_gene_info

            self._gene_info = SymbolResolver(
                read_gene_info(knowledge_file("gene_info", self.knowledge_root, self.allow_download))
            )
        return self._gene_info

    @property
    def vocab_symbol_of(self) -> dict[int, str]:
        """GeneID -> the training-vocabulary symbol that training-time knowledge resolved to it."""
        if self._vocab_symbol_of is None:
            mapping = self.gene_info.resolve_many(self.vocab.symbols, self.ensembl_ids).mapping
            self._vocab_symbol_of = {}
            for symbol in self.vocab.symbols:  # vocab order: the first symbol of a gene wins, deterministically
                if symbol in mapping:
                    self._vocab_symbol_of.setdefault(mapping[symbol], symbol)
        return self._vocab_symbol_of

    def perturbation(self, asked: str) -> Resolved:
        if asked in self.vocab:
            return Resolved(asked, "pert", asked, True, "training vocabulary")
        answer = self.gene_info.resolve_query(asked)
        if answer.refused:
            return Resolved(asked, "pert", refused=answer.refused)
        known = self.vocab_symbol_of.get(answer.gene_id)
        if known is not None:
            return Resolved(asked, "pert", known, True, f"{answer.how} -> {known} (training vocabulary)")
        if answer.official in self.vocab:
            return Resolved(
                asked,
                "pert",
                refused=f"{asked} resolves to {answer.official} (GeneID {answer.gene_id}), "
                "but the training vocabulary uses that symbol for another gene",
            )
        return Resolved(asked, "pert", answer.official, False, f"{answer.how} -> {answer.official}")

    def gene(self, asked: str) -> Resolved:
        if asked in self.measured:
            return Resolved(asked, "gene", asked, True, "measured downstream gene")
        symbol = None
        answer = self.gene_info.resolve_query(asked)
        if answer.gene_id is not None:
            symbol = self.vocab_symbol_of.get(answer.gene_id)
        if symbol is not None and symbol in self.measured:
            return Resolved(asked, "gene", symbol, True, f"{answer.how} -> {symbol} (measured downstream gene)")
        reason = answer.refused or (
            f"{asked} ({answer.official}) was not measured as a downstream gene in this "
            "dataset: the model was not trained to score it"
        )
        return Resolved(asked, "gene", refused=reason)

    def all_known(self) -> list[str]:
        """Every gene with at least one GO annotation (gene2go), named by its training-vocabulary symbol when
        the model knows it, else by its official symbol; in gene_info order."""
        from perturb_models.knowledge.files import knowledge_file
        from perturb_models.knowledge.go import read_gene2go

        annotated = set(
            read_gene2go(knowledge_file("gene2go", self.knowledge_root, self.allow_download))["gene"].unique()
        )
        info = self.gene_info.gene_info
        symbols = []
        for gid, official in zip(info["gene_id"], info["symbol"]):
            if int(gid) in annotated:
                symbols.append(self.vocab_symbol_of.get(int(gid), official))
        return list(dict.fromkeys(symbols))


def knowledge_flags(
    symbols: Sequence[str],
    knowledge_root: str | None,
    allow_download: bool,
    ensembl_ids: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Per symbol: ``go`` (it has GO annotations, what every knowledge-describing model reads: graphs, and
    the GO part of gene texts) or ``none`` (the model answers from the gene's training-time treatment or its
    gene_info name alone: read the answer as the dataset's base rates). Resolved as training-time knowledge
    resolves symbols."""
    from perturb_models.knowledge.annotations import symbol_go_terms
    from perturb_models.knowledge.files import KnowledgeFileError

    try:
        terms, _report = symbol_go_terms(
            list(symbols), knowledge_root, allow_download=allow_download, ensembl_ids=ensembl_ids
        )
    except KnowledgeFileError as exc:  # only genes of the training vocabulary were asked, and no file is at hand
        log.warning("pert_knowledge left 'unknown': %s", str(exc).splitlines()[0])
        return {s: "unknown" for s in symbols}
    return {s: "go" if s in terms else "none" for s in symbols}


# ---- scoring ----------------------------------------------------------------------------------------


@torch.no_grad()
def score_pairs(
    model, pert_idx: np.ndarray, gene_idx: np.ndarray, batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
    """The benchmark scores of each pair (``de``, ``dir`` as the task gives), exactly as the classifier's
    test loop computes them: ``decode_logits(logits)`` per batch, in float64."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(pert_idx), batch_size):
        batch = {
            "pert": torch.as_tensor(pert_idx[start : start + batch_size], dtype=torch.long, device=device),
            "gene": torch.as_tensor(gene_idx[start : start + batch_size], dtype=torch.long, device=device),
        }
        for key, value in decode_logits(model(batch).float(), model.task).items():
            out.setdefault(key, []).append(value.cpu().numpy())
    return {key: np.concatenate(parts) for key, parts in out.items()}


def prediction_table(perts: Sequence[str], genes: Sequence[str], scores: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per (pert, gene), perturbations in asked order, genes in the given order; ranks by the
    chance of a change (``p_de``; ``p_up_given_de`` for a direction-only model), 1 = most likely."""
    n_genes = len(genes)
    frame = pd.DataFrame(
        {
            "pert": np.repeat(np.asarray(perts, dtype=object), n_genes),
            "gene": np.tile(np.asarray(genes, dtype=object), len(perts)),
        }
    )
    nan = np.full(len(frame), np.nan)
    frame["p_de"] = scores.get("de", nan)
    frame["p_up_given_de"] = scores.get("dir", nan)
    frame["p_down_given_de"] = 1.0 - frame["p_up_given_de"]
    key = "p_de" if "de" in scores else "p_up_given_de"
    frame["rank_in_pert"] = frame.groupby("pert", sort=False)[key].rank(ascending=False, method="min").astype(np.int64)
    frame["rank_in_gene"] = frame.groupby("gene", sort=False)[key].rank(ascending=False, method="min").astype(np.int64)
    return frame


def summary_lines(frame: pd.DataFrame, top: int, max_perts: int) -> list[str]:
    """Per perturbation: the genes most likely to go up and to go down (p_de x p(direction | DE))."""
    lines = []
    has_de, has_dir = frame["p_de"].notna().any(), frame["p_up_given_de"].notna().any()
    perts = list(dict.fromkeys(frame["pert"]))
    for pert in perts[:max_perts]:
        rows = frame.loc[frame["pert"] == pert]
        de = rows["p_de"] if has_de else pd.Series(1.0, index=rows.index)
        flag = rows["pert_knowledge"].iloc[0]
        known = "in training vocabulary" if rows["pert_in_training_vocab"].iloc[0] else "new to the model"
        lines.append(f"{pert} ({known}; knowledge: {flag})")
        if has_dir:
            for label, column in (("up", "p_up_given_de"), ("down", "p_down_given_de")):
                chance = de * rows[column]
                best = rows.assign(chance=chance).nlargest(top, "chance")
                shown = ", ".join(f"{g} {c:.2f}" for g, c in zip(best["gene"], best["chance"]))
                lines.append(f"  {label:<5}{shown}")
        else:
            best = rows.nsmallest(top, "rank_in_pert")
            lines.append("  DE   " + ", ".join(f"{g} {p:.2f}" for g, p in zip(best["gene"], best["p_de"])))
    if len(perts) > max_perts:
        lines.append(f"... and {len(perts) - max_perts} more perturbations in predictions.csv")
    return lines


# ---- screens in parts (resumable) -------------------------------------------------------------------

PARTS_FOLDER = "predictions.parts"


class PartStore:
    """Finished parts of a screen in ``<run>/predictions.parts/`` (pickled frames: exact float64, unlike
    CSV), with the query they belong to. A rerun of the same query into the same run folder
    (``hydra.run.dir=...``) keeps the parts it finds and scores the rest; another query discards them.
    Removed once ``predictions.csv`` is written."""

    def __init__(self, folder: Path, query: dict[str, Any]):
        import hashlib
        import json

        self.folder = folder
        self.key = hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()
        self.reused = 0
        key_file = folder / "query.key"
        if folder.is_dir() and (not key_file.is_file() or key_file.read_text().strip() != self.key):
            log.warning("%s holds parts of another query: discarded", folder)
            self.remove()
        if not folder.is_dir():
            folder.mkdir(parents=True)
            atomic_write_json(folder / "query.json", query)
            atomic_write_text(key_file, self.key + "\n")

    def path(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}.pkl"

    def load(self, index: int) -> pd.DataFrame | None:
        path = self.path(index)
        if not path.is_file():
            return None
        self.reused += 1
        return pd.read_pickle(path)

    def save(self, index: int, frame: pd.DataFrame) -> None:
        import io

        from perturb_models.io import atomic_write_bytes

        buffer = io.BytesIO()
        frame.to_pickle(buffer)
        atomic_write_bytes(self.path(index), buffer.getvalue())

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


PROBE_PAIRS = 16
PROBE_SECONDS = 0.5
PROBE_GROWTH = 8
PROBE_MAX_PAIRS = 1 << 18


def duration(seconds: float) -> str:
    """``42 s``, ``7.5 min`` or ``3.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def scoring_rate(
    model, vocab: GeneVocab, perts: Sequence[str], genes: Sequence[str], batch_size: int, device, limit: int
) -> tuple[float, int]:
    """Pairs per second of ``score_pairs`` on the screen's own first pairs, and how many pairs that was timed
    on: calls of ``PROBE_PAIRS``, then ``PROBE_GROWTH`` times more pairs each, until one call takes
    ``PROBE_SECONDS`` (or reaches ``limit`` pairs); the rate is that call's. A call has a fixed cost (its
    first batch's set-up, the ensemble's members in turn) that a small probe of a batched model would read as
    its speed: knn scores about 100,000 pairs/s on 2 cores, but 16 pairs take about as long as 1,000. An LLM
    takes its time from the first call. The scores are thrown away; the model holds no state that scoring
    changes."""
    pairs = min(PROBE_PAIRS, limit)
    while True:
        rows = np.arange(pairs)
        pert_idx = vocab.encode([perts[i] for i in rows // len(genes)])
        gene_idx = vocab.encode([genes[i] for i in rows % len(genes)])
        began = time.perf_counter()
        score_pairs(model, pert_idx, gene_idx, min(batch_size, pairs), device)
        took = max(time.perf_counter() - began, 1e-9)
        if took >= PROBE_SECONDS or pairs >= limit:
            return pairs / took, pairs
        pairs = min(pairs * PROBE_GROWTH, limit)


def score_in_parts(
    model,
    encoder,
    vocab: GeneVocab,
    perts: Sequence[str],
    genes: Sequence[str],
    parts: PartStore,
    batch_size: int,
    chunk_pairs: int,
    device: torch.device,
    evidence: bool,
) -> tuple[pd.DataFrame, float]:
    """Raw scores (``score_de``, ``score_dir``) and evidence columns of every (pert, gene) pair, perturbation
    by perturbation in parts of about ``chunk_pairs`` pairs, each written as it finishes (so a killed screen
    resumes); returns the frame in pert-major order and the seconds spent scoring in this call."""
    per_part = max(1, chunk_pairs // max(1, len(genes)))
    gene_codes = vocab.encode(genes)
    frames, seconds = [], 0.0
    starts = list(range(0, len(perts), per_part))
    pairs_todo = len(genes) * sum(
        len(perts[s : s + per_part]) for i, s in enumerate(starts) if not parts.path(i).is_file()
    )
    rate, timed = (
        scoring_rate(model, vocab, perts, genes, batch_size, device, min(pairs_todo, PROBE_MAX_PAIRS))
        if pairs_todo > 4 * PROBE_PAIRS
        else (None, 0)
    )
    if rate is not None and pairs_todo / rate >= 10:
        say(
            f"estimated scoring time ~{duration(pairs_todo / rate)} for {pairs_todo:,} pairs ({rate:,.1f} pairs/s "
            f"over {timed:,} timed pairs; evidence columns not included); each part is saved as it finishes, "
            "so a killed screen resumes"
        )
    for index, start in enumerate(starts):
        frame = parts.load(index)
        if frame is None:
            began = time.perf_counter()
            chunk = perts[start : start + per_part]
            pert_idx = np.repeat(vocab.encode(chunk), len(genes))
            gene_idx = np.tile(gene_codes, len(chunk))
            scores = score_pairs(model, pert_idx, gene_idx, batch_size, device)
            frame = pd.DataFrame({f"score_{key}": value for key, value in scores.items()})
            if evidence:
                for column, values in encoder.evidence(pert_idx, gene_idx).items():
                    frame[column] = values
            parts.save(index, frame)
            seconds += time.perf_counter() - began
            if len(starts) > 1:
                done = sum(len(f) for f in frames) + len(frame)
                speed = len(frame) / max(time.perf_counter() - began, 1e-9)
                log.info(
                    "part %d/%d scored (%d pairs, %.0f pairs/s this call; ~%s left)",
                    index + 1,
                    len(starts),
                    done,
                    speed,
                    duration((len(perts) * len(genes) - done) / speed),
                )
        frames.append(frame)
    if parts.reused:
        say(f"resumed: {parts.reused} of {len(starts)} parts were already scored in {parts.folder}")
    return pd.concat(frames, ignore_index=True), seconds


# ---- the command ------------------------------------------------------------------------------------


def _load(cfg: DictConfig):
    """The checkpoint's record, DataModule and model with its weights (as evaluate.py rebuilds them)."""
    from perturb_models.runners import runner_for
    from perturb_models.runs import find_checkpoint, load_run_record

    ckpt_file = find_checkpoint(cfg.ckpt_path)
    checkpoint, record = load_run_record(ckpt_file)
    run_cfg = OmegaConf.create(record["config"])
    runner = runner_for(run_cfg)
    if not runner.predicts_pairs:
        raise ConfigError(
            f"{ckpt_file} is a {runner.name} run (data.task={run_cfg.data.get('task')}): predict.py asks pair "
            "models (which genes change after a knockdown); name gene sets with evaluate.py"
        )
    run_cfg, datamodule, model = runner.restore(checkpoint, record, cfg.get("data_root"))
    return ckpt_file, record, run_cfg, datamodule, model


def measured_downstream_genes(datamodule) -> list[str]:
    """Every downstream gene of the checkpoint's dataset (train, validation and test pairs), sorted."""
    genes = set(datamodule.context.train_pairs["gene"])
    for frame in datamodule.frames.values():
        genes.update(frame["gene"])
    return sorted(genes)


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Answer the query of ``cfg`` (conf/predict.yaml) and write the run folder; returns the predictions."""
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is missing: pass ckpt_path=RUN_DIR (a train.py run folder) or a .ckpt file")
    perts_asked = asked_symbols(cfg.get("perts"), "perts")
    if perts_asked is None:
        raise ConfigError("perts is missing: pass perts=[GENE,...], perts=FILE (symbols) or perts=all_known")
    genes_asked = asked_symbols(cfg.get("genes"), "genes")
    for option in ("batch_size", "chunk_pairs"):
        if int(cfg.get(option)) < 1:
            raise ConfigError(f"{option}={cfg.get(option)}: must be a positive number")
    ckpt_file, record, run_cfg, datamodule, model = _load(cfg)
    encoder = model.encoder
    context = datamodule.context
    knowledge = run_cfg.get("knowledge") or {}
    knowledge_root = cfg.get("knowledge_root") or knowledge.get("root")
    allow_download = bool(knowledge.get("allow_download", True))
    measured = measured_downstream_genes(datamodule)
    resolver = QueryResolver(context.vocab, measured, knowledge_root, allow_download, context.ensembl_ids)

    perts_list = resolver.all_known() if perts_asked == ALL_KNOWN else perts_asked
    perts = [resolver.perturbation(s) for s in perts_list]
    genes = (
        [Resolved(g, "gene", g, True, "default: measured downstream gene") for g in measured]
        if genes_asked is None
        else [resolver.gene(s) for s in genes_asked]
    )
    if not encoder.describes_new_perturbations:
        reason = (
            f"model {record['config']['model'].get('name', type(encoder).__name__)} cannot describe a "
            f"perturbation outside its training vocabulary: {encoder.new_perturbation_refusal}"
        )
        for item in perts:
            if item.refused is None and not item.in_training_vocab:
                item.refused = f"{item.asked} ({item.symbol}) is not in the training vocabulary; {reason}"
                item.symbol = None
    # One answer per vocabulary symbol, in asked order (two spellings of one gene are answered once).
    answered_perts = list(dict.fromkeys(p.symbol for p in perts if p.refused is None))
    answered_genes = list(dict.fromkeys(g.symbol for g in genes if g.refused is None))
    refused = [item for item in perts + genes if item.refused]
    if perts_asked != ALL_KNOWN or len(refused) <= 20:
        for item in refused:
            say(f"refused {item.role} {item.refused}", level=logging.WARNING)
    else:
        say(f"refused {len(refused)} symbols (listed in query.json)", level=logging.WARNING)
    if not answered_perts:
        first = next(p for p in perts if p.refused)
        raise QueryError(
            first.refused
            if len(perts) == 1
            else f"no perturbation can be answered ({len(perts)} asked); the first: {first.refused}"
        )
    if not answered_genes:
        raise QueryError(f"no downstream gene can be answered ({len(genes)} asked); the first: {genes[0].refused}")

    new = [s for s in answered_perts if s not in context.vocab]
    vocab = GeneVocab(context.vocab.symbols + new)
    if new:
        extended = replace(context, vocab=vocab)
        encoder.extend_vocabulary(extended)
        model.vocab = vocab
        log.info(
            "predict: %d perturbations outside the training vocabulary appended after its %d genes",
            len(new),
            len(context.vocab),
        )
    flags = knowledge_flags(answered_perts, knowledge_root, allow_download, context.ensembl_ids)
    for item in perts:
        if item.refused is None:
            item.knowledge = flags[item.symbol]

    device = torch.device(cfg.get("device") or "cpu")
    model.to(device)
    say(
        f"scoring {len(answered_perts) * len(answered_genes):,} pairs ({len(answered_perts):,} perturbations x "
        f"{len(answered_genes):,} genes) with {record['config']['model'].get('name')} from {ckpt_file}"
    )
    parts = PartStore(
        output_dir / PARTS_FOLDER,
        {
            "checkpoint": str(ckpt_file),
            "checkpoint_bytes": ckpt_file.stat().st_size,
            "checkpoint_mtime_ns": ckpt_file.stat().st_mtime_ns,
            "perts": answered_perts,
            "genes": answered_genes,
            "evidence": bool(cfg.get("evidence", True)),
            "chunk_pairs": int(cfg.chunk_pairs),
        },
    )
    raw, scoring_seconds = score_in_parts(
        model,
        encoder,
        vocab,
        answered_perts,
        answered_genes,
        parts,
        int(cfg.batch_size),
        int(cfg.chunk_pairs),
        device,
        bool(cfg.get("evidence", True)),
    )
    scores = {key: raw[f"score_{key}"].to_numpy() for key in ("de", "dir") if f"score_{key}" in raw}
    calibrators = model.calibrators or {}
    calibrated = {
        key: apply_calibrator(value, calibrators[key]) if key in calibrators else value for key, value in scores.items()
    }
    frame = prediction_table(answered_perts, answered_genes, calibrated)
    for key, column in (("de", "p_de_uncalibrated"), ("dir", "p_up_given_de_uncalibrated")):
        if key in calibrators:
            frame[column] = scores[key]
    frame["pert_in_training_vocab"] = frame["pert"].isin(set(context.vocab.symbols))
    frame["pert_knowledge"] = frame["pert"].map(flags)
    for column in raw.columns:
        if not column.startswith("score_"):
            frame[column] = raw[column].to_numpy()
    atomic_write_dataframe(output_dir / "predictions.csv", frame)
    parts.remove()
    query = {
        "checkpoint": str(ckpt_file),
        "model": record["config"]["model"].get("name"),
        "dataset": context.dataset,
        "task": context.task,
        "asked": {
            "perts": perts_asked if perts_asked == ALL_KNOWN else list(perts_asked),
            "genes": "measured downstream genes (default)" if genes_asked is None else list(genes_asked),
        },
        "perturbations": [asdict(p) for p in perts if p.refused is None],
        "genes": (
            {"count": len(answered_genes), "default": True}
            if genes_asked is None
            else [asdict(g) for g in genes if g.refused is None]
        ),
        "refused": [{"asked": r.asked, "role": r.role, "reason": r.refused} for r in refused],
        "calibration": (
            {key: dict(value) for key, value in calibrators.items()}
            if calibrators
            else "none: the checkpoint holds no calibrator (trained before calibration existed); "
            "p_de and p_up_given_de are the model's scores"
        ),
        "pairs": int(len(frame)),
        "new_perturbations": len(new),
        "scoring_seconds": round(scoring_seconds, 3),
        "parts_reused": parts.reused,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(output_dir / "query.json", query)
    say("\n".join(summary_lines(frame, int(cfg.summary_top), int(cfg.summary_perts))))
    say(
        f"{len(frame):,} predictions written to {output_dir / 'predictions.csv'} "
        f"({len(frame) / max(scoring_seconds, 1e-9):,.0f} "
        f"pairs/s); the query and its resolution in query.json"
    )
    return frame
