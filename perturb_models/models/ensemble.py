"""``model=ensemble``: stacking of member models' class probabilities, weights fitted on validation only.

Each member is an ordinary model of the project (its config from ``conf/model/``). Its kind of run,
``stacking`` (``perturb_models/runners/stacking.py``), first gives every member a finished run: either
trained as its own run into ``<run>/members/<name>`` (same data, seed and validation split as the ensemble;
its trainer and callbacks, plus ``member_overrides.<name>``), or one the user names
(``member_runs.<name>``: a run folder or checkpoint of the same dataset, seed and validation split), which
costs no training. When the ensemble is fitted (the setup of its first ``trainer.fit``), it loads every
member from its run.

Then the members are frozen and the combination is fitted on the validation perturbations only, per task
score (DE, and direction on DE pairs), by one of two combiners (``combiner``; ``COMBINERS`` below):

- ``loglik``: ``s = sum_m w_m p_m`` with simplex weights maximising the validation log-likelihood (EM:
  concave, a unique optimum without a learning rate or regulariser; the output stays a probability);
- ``rank``: ``s = sigmoid(sum_m w_m logit p_m)`` with simplex weights minimising a pairwise logistic loss
  between positive and negative validation pairs of the same downstream gene, every gene weighing the same:
  the smooth surrogate of the metric, the mean per-gene AUROC, which ranks perturbations within a gene and
  never compares scores across genes.

Simplex weights rather than a free logistic combiner: a ranking metric gains nothing from a free intercept,
and unconstrained weights can turn negative on correlated members. Then the **guard** (``guard: true``): the
combination is scored on validation pairs its weights never saw (``crossfit_folds`` folds of validation
perturbations, each scored by weights fitted on the others); where it ranks worse than its best member by
more than the noise (the 95% paired interval of the difference lies below 0), that member alone answers for
the task. ``ensemble_weights.json`` records the
weights, every member's and the combination's validation figures, the paired difference (with its 95%
interval and p-value) and the fallback. A one-member ensemble is that member. Test labels are never read here.

The ensemble's checkpoint holds every member's weights and the combination weights; ``evaluate.py``
rebuilds the members from ``catalog`` (the members' model configs, stored in the ensemble's config, built
by the runner's ``build_member``) and loads them from the checkpoint alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perturb_models.config import plain
from perturb_models.data.datamodule import DataContext
from perturb_models.models.base import Encoder
from perturb_models.runs import find_checkpoint, load_run_record
from perturb_models.tasks import get_task, scored_pairs

log = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    """Nested report -> JSON: NaN (a figure that could not be computed) becomes null, numpy numbers floats."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    return value


def fit_convex_weights(scores: np.ndarray, labels: np.ndarray, max_iter: int = 2000, tol: float = 1e-10) -> np.ndarray:
    """Mixture weights on the simplex maximising sum_i log sum_m w_m P_m(y_i) (EM; ``scores`` are P(y=1)).

    Args:
        scores: (N, M) member probabilities of the positive class.
        labels: (N,) 0/1 labels.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or len(scores) != len(labels):
        raise ValueError(f"scores must be (N, M) with N = len(labels); got {scores.shape} and {labels.shape}")
    m = scores.shape[1]
    if len(labels) == 0:
        raise ValueError("no validation pairs to fit the ensemble weights on")
    likelihood = np.clip(np.where(labels[:, None] == 1, scores, 1.0 - scores), 1e-12, 1.0)
    weights = np.full(m, 1.0 / m)
    for _ in range(max_iter):
        responsibility = likelihood * weights
        responsibility /= responsibility.sum(axis=1, keepdims=True)
        new = responsibility.mean(axis=0)
        converged = np.abs(new - weights).max() < tol
        weights = new
        if converged:
            break
    return weights


COMBINERS = ("loglik", "rank")
"""How the members' scores are combined (``model.encoder.combiner``):

- ``loglik``: a linear pool ``sum_m w_m p_m`` with simplex weights that maximise the validation
  log-likelihood (EM, ``fit_convex_weights``).
- ``rank``: a logarithmic pool ``sigmoid(sum_m w_m logit p_m)`` with simplex weights that minimise a
  pairwise logistic loss between the positive and negative validation pairs *of the same downstream gene*,
  each gene weighing the same: the smooth surrogate of the mean per-gene AUROC, the metric itself
  (``fit_rank_weights``). Scores are never compared across genes, which the per-gene metric ignores too.
"""

EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def within_gene_pairs(
    labels: np.ndarray, genes: np.ndarray, max_pairs: int = 2_000_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positive index, negative index, weight) of every positive-negative pair of the same gene; each gene
    with both classes weighs 1 / (genes scored) in total, as in the mean per-gene AUROC. Above ``max_pairs``
    a seeded sample of each gene's pairs keeps the per-gene weights."""
    labels, genes = np.asarray(labels), np.asarray(genes)
    pos_idx, neg_idx, weight = [], [], []
    order = np.argsort(genes, kind="stable")
    bounds = np.flatnonzero(np.r_[True, genes[order][1:] != genes[order][:-1], True])
    groups = [order[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
    scored = [(g[labels[g] == 1], g[labels[g] != 1]) for g in groups]
    scored = [(p, n) for p, n in scored if len(p) and len(n)]
    if not scored:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    total = sum(len(p) * len(n) for p, n in scored)
    keep = min(1.0, max_pairs / total)
    rng = np.random.default_rng(seed)
    for p, n in scored:
        i, j = np.meshgrid(p, n, indexing="ij")
        i, j = i.ravel(), j.ravel()
        if keep < 1.0:
            chosen = rng.random(len(i)) < keep
            if not chosen.any():
                chosen[rng.integers(len(i))] = True
            i, j = i[chosen], j[chosen]
        pos_idx.append(i)
        neg_idx.append(j)
        weight.append(np.full(len(i), 1.0 / (len(i) * len(scored))))
    return np.concatenate(pos_idx), np.concatenate(neg_idx), np.concatenate(weight)


def rank_surrogate(
    weights: torch.Tensor,
    logits: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    pair_weight: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The pairwise logistic loss of the combined logits over within-gene pairs (lower is better ranking)."""
    combined = logits @ weights
    return (pair_weight * nn.functional.softplus(-scale * (combined[pos] - combined[neg]))).sum()


def fit_rank_weights(scores: np.ndarray, labels: np.ndarray, genes: np.ndarray, steps: int = 200) -> np.ndarray:
    """Simplex weights for the logarithmic pool that minimise the within-gene pairwise logistic loss.

    Args:
        scores: (N, M) member probabilities of the positive class.
        labels: (N,) 0/1 labels.
        genes: (N,) downstream gene of each pair (pairs are only compared within a gene).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) != len(labels) or len(labels) != len(genes):
        raise ValueError(
            f"scores must be (N, M) with N = len(labels) = len(genes); got {scores.shape}, "
            f"{len(labels)} labels, {len(genes)} genes"
        )
    m = scores.shape[1]
    pos, neg, pair_weight = within_gene_pairs(labels, genes)
    if m == 1 or len(pos) == 0:
        return np.full(m, 1.0 / m)
    logits = torch.as_tensor(_logit(scores))
    pos, neg = torch.as_tensor(pos), torch.as_tensor(neg)
    pair_weight = torch.as_tensor(pair_weight)
    # Softmax keeps the weights on the simplex; the free log-scale is the surrogate's temperature.
    raw = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([raw, log_scale], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = rank_surrogate(torch.softmax(raw, 0), logits, pos, neg, pair_weight, log_scale.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.softmax(raw, 0).detach().numpy()


def combine(scores: np.ndarray, weights: np.ndarray, combiner: str) -> np.ndarray:
    """The pooled probability of (N, M) member probabilities under ``combiner``."""
    scores = np.asarray(scores, dtype=np.float64)
    if combiner == "loglik":
        return scores @ weights
    return 1.0 / (1.0 + np.exp(-(_logit(scores) @ weights)))


def fit_combiner(scores: np.ndarray, labels: np.ndarray, genes: np.ndarray, combiner: str) -> np.ndarray:
    if combiner == "loglik":
        return fit_convex_weights(scores, labels)
    if combiner == "rank":
        return fit_rank_weights(scores, labels, genes)
    raise ValueError(f"model.encoder.combiner={combiner!r}: choose one of {', '.join(COMBINERS)}")


def crossfit_scores(
    scores: np.ndarray,
    labels: np.ndarray,
    genes: np.ndarray,
    perts: np.ndarray,
    combiner: str,
    folds: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """The ensemble's validation scores with every pair scored by weights fitted on the *other* folds of
    validation perturbations: an honest validation figure for a combiner fitted on validation."""
    unique, pert_ids = np.unique(perts, return_inverse=True)
    fold = (np.random.default_rng(seed).permutation(len(unique)) % folds)[pert_ids]
    out = np.empty(len(labels))
    for k in range(folds):
        held, fit = fold == k, fold != k
        weights = (
            fit_combiner(scores[fit], labels[fit], genes[fit], combiner)
            if fit.any()
            else np.full(scores.shape[1], 1.0 / scores.shape[1])
        )
        out[held] = combine(scores[held], weights, combiner)
    return out


def guarded_report(
    task: str,
    scores: np.ndarray,
    labels: np.ndarray,
    genes: np.ndarray,
    perts: np.ndarray,
    member_names: Sequence[str],
    combiner: str,
    folds: int = 2,
    guard: bool = True,
) -> dict[str, Any]:
    """Validation per-gene AUROC of each member and of the combination (cross-fitted over ``folds`` folds
    of validation perturbations), their paired difference (combination − best member: difference, 95%
    interval, p-value) and the guard's decision: ``fallback`` names the best member when the combination
    ranks worse than it on pairs its weights never saw by more than the noise (the whole 95% paired interval
    below 0; validation sets are small, and a point difference below 0 fell back on noise), else None."""
    import pandas as pd

    from perturb_models.metrics import auroc_per_gene, paired_bootstrap

    members = {m: auroc_per_gene(labels, scores[:, j], genes)[0] for j, m in enumerate(member_names)}
    scored = {m: v for m, v in members.items() if not np.isnan(v)}
    best = max(scored, key=scored.get) if scored else member_names[0]
    report: dict[str, Any] = {
        "combiner": combiner,
        "members": members,
        "best_member": best,
        "ensemble_crossfit": float("nan"),
        "difference": None,
        "fallback": None,
        "validation_pairs": int(len(labels)),
    }
    if len(member_names) == 1 or not scored:
        return report
    crossfit = crossfit_scores(scores, labels, genes, perts, combiner, folds)
    report["ensemble_crossfit"] = auroc_per_gene(labels, crossfit, genes)[0]
    frame = pd.DataFrame({"task": task, "pert": perts, "gene": genes, "label": labels})
    paired = paired_bootstrap(
        frame.assign(score=crossfit), frame.assign(score=scores[:, list(member_names).index(best)]), task
    )
    report["difference"] = [paired.difference, paired.low, paired.high, paired.p_value]
    if guard and paired.high < 0:
        report["fallback"] = best
    return report


class EnsembleEncoder(Encoder):
    """Frozen member models combined per task score by convex weights fitted on validation pairs.

    Args:
        members: names of the members, each a key of ``catalog``.
        catalog: model configs (as under ``conf/model/``) the members are built from.
        build_member: the runner's factory of a member model (a classifier) from its model config.
        member_runs: name -> finished run folder or checkpoint each member is loaded from when the ensemble
            is fitted (the stacking runner fills in the members it trained).
        member_overrides: name -> config merged into that member's training config by the runner
            (e.g. ``{data: {batch_size: 1024}, trainer: {max_epochs: 12}}``).
        run: ignored; configs written before runners existed carry it.
    """

    produces_logits = True
    runner = "stacking"

    def __init__(
        self,
        context: DataContext,
        members: Sequence[str],
        catalog: Mapping[str, Any],
        build_member: Callable[[Mapping[str, Any]], nn.Module] | None = None,
        member_runs: Mapping[str, str] | None = None,
        member_overrides: Mapping[str, Any] | None = None,
        run: Mapping[str, Any] | None = None,
        combiner: str = "loglik",
        guard: bool = True,
        crossfit_folds: int = 2,
    ):
        super().__init__()
        if combiner not in COMBINERS:
            raise ValueError(f"model.encoder.combiner={combiner!r}: choose one of {', '.join(COMBINERS)}")
        if int(crossfit_folds) < 2:
            raise ValueError(f"model.encoder.crossfit_folds={crossfit_folds}: needs at least 2 folds")
        self.combiner, self.guard, self.crossfit_folds = combiner, bool(guard), int(crossfit_folds)
        self.validation_report: dict[str, Any] = {}
        if build_member is None:
            raise ValueError(
                "EnsembleEncoder needs build_member (its runner's member factory): build model=ensemble "
                "through perturb_models.runners (train.py, evaluate.py, predict.py do)"
            )
        members, catalog = list(plain(members) or []), plain(catalog) or {}
        if not members:
            raise ValueError("model.encoder.members is empty: list at least one model (e.g. [knn, gears])")
        if len(set(members)) != len(members):
            raise ValueError(f"model.encoder.members lists a model twice: {members}")
        absent = [m for m in members if m not in catalog]
        if absent:
            raise ValueError(
                f"model.encoder.members lists {absent[0]!r}, which is not in model.encoder.catalog "
                f"(has {', '.join(catalog)}); add it with +model@model.encoder.catalog.{absent[0]}={absent[0]}"
            )
        self.task = get_task(context.task)
        self.context = context
        self.member_names = members
        self.member_configs = {m: catalog[m] for m in members}
        self.member_runs = dict(plain(member_runs) or {})
        unknown = [m for m in self.member_runs if m not in members]
        if unknown:
            raise ValueError(
                f"model.encoder.member_runs names {unknown[0]!r}, which is not a member ({', '.join(members)})"
            )
        self.member_overrides = dict(plain(member_overrides) or {})
        self.members = nn.ModuleDict({m: build_member(self.member_configs[m]) for m in members})
        # Members are fitted by their own runs and then fixed: the ensemble itself trains no parameter
        # (its weights are fitted on validation in prepare_datamodule), so it needs no optimizer.
        for parameter in self.members.parameters():
            parameter.requires_grad_(False)
        keys = self.task.scores
        self.register_buffer("weights", torch.full((len(keys), len(members)), 1.0 / len(members), dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # Per task score: the member the guard fell back to (its index), or -1 for the combination.
        self.register_buffer("fallback", torch.full((len(keys),), -1, dtype=torch.long))
        self.output_dim = context.num_classes

    def train(self, mode: bool = True) -> EnsembleEncoder:
        # Members are fixed predictors: no dropout, whatever mode the ensemble is in.
        super().train(mode)
        self.members.eval()
        return self

    # ---- fitting ---------------------------------------------------------------------------------
    def prepare_datamodule(self, datamodule) -> None:
        for member in self.members.values():
            prepare = getattr(member.encoder, "prepare_datamodule", None)
            if callable(prepare):
                prepare(datamodule)
        if bool(self.fitted):
            return
        absent = [name for name in self.member_names if not self.member_runs.get(name)]
        if absent:
            raise ValueError(
                f"ensemble member {absent[0]!r} has no run to load: the stacking runner trains the members "
                f"(train.py model=ensemble), or pass +model.encoder.member_runs.{absent[0]}=<its run folder>"
            )
        for name in self.member_names:
            self._load_member(name, self.member_runs[name])
        self.fit_weights(datamodule.val_dataloader())

    def _load_member(self, name: str, source: str | Path) -> None:
        ckpt_file = find_checkpoint(source)
        checkpoint, record = load_run_record(ckpt_file)
        where = f"member {name!r} ({ckpt_file})"
        if record.get("vocab") != list(self.context.vocab.symbols):
            raise ValueError(f"{where} was trained on another gene vocabulary (another dataset?) than this run's")
        if list(record.get("val_perts", [])) != list(self.context.val_perts):
            raise ValueError(
                f"{where} used other validation perturbations than this run (another seed or "
                f"val_fraction?); its validation predictions would not be held out"
            )
        saved = record["config"]["model"]["encoder"]
        wanted = plain(self.member_configs[name]["encoder"])
        if saved != wanted:
            differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ValueError(
                f"{where} was trained with another encoder config than model.encoder.catalog.{name} "
                f"(differs in {', '.join(differ)}); set the catalog entry to the run's recipe"
            )
        self.members[name].load_state_dict(checkpoint["state_dict"])
        log.info("ensemble: member %s loaded from %s", name, ckpt_file)

    @torch.no_grad()
    def member_scores(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per task score key: (B, M) member scores in float64."""
        per_member = [self.task.decode_logits(self.members[m](batch).float()) for m in self.member_names]
        return {k: torch.stack([s[k] for s in per_member], dim=1) for k in self.task.scores}

    @torch.no_grad()
    def fit_weights(self, loader) -> None:
        """Fit the combination per task score on the validation pairs of ``loader`` (no test label read),
        then guard it: where the combination, scored by cross-fitting on validation, ranks clearly worse than its
        best member, that member alone answers for the task."""
        was_training = self.training
        self.eval()
        keys = self.task.scores
        collected = {k: {"scores": [], "labels": [], "genes": [], "perts": []} for k in keys}
        for batch in loader:
            batch = {k: v.to(self.weights.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            member = self.member_scores(batch)
            for key in keys:
                # The pairs that score this task and their targets, as in the metrics.
                keep, target = scored_pairs(key, batch["de"], batch["dir"])
                part = collected[key]
                part["scores"].append(member[key][keep].cpu())
                part["labels"].append(target[keep].cpu())
                part["genes"].append(batch["gene"][keep].cpu())
                part["perts"].append(batch["pert"][keep].cpu())
        self.validation_report = {}
        for i, key in enumerate(keys):
            scores, labels, genes, perts = (
                torch.cat(collected[key][name]).numpy() for name in ("scores", "labels", "genes", "perts")
            )
            w = fit_combiner(scores, labels, genes, self.combiner)
            self.weights[i] = torch.as_tensor(w, dtype=self.weights.dtype)
            report = guarded_report(
                key, scores, labels, genes, perts, self.member_names, self.combiner, self.crossfit_folds, self.guard
            )
            self.fallback[i] = -1 if report["fallback"] is None else self.member_names.index(report["fallback"])
            self.validation_report[key] = report
            log.info(
                "ensemble: %s %s weights %s (fitted on %d validation pairs); cross-fitted validation per-gene "
                "AUROC %.4f, best member %s %.4f%s",
                key,
                self.combiner,
                ", ".join(f"{m}={v:.3f}" for m, v in zip(self.member_names, w)),
                len(labels),
                report["ensemble_crossfit"],
                report["best_member"],
                report["members"][report["best_member"]],
                f"; guard: falls back to {report['fallback']}" if report["fallback"] else "",
            )
        self.fitted.fill_(True)
        self.train(was_training)

    def weight_report(self) -> dict[str, Any]:
        """``ensemble_weights.json``: the weights per task score, then the combiner and the guard's figures."""
        return {
            **self.weight_table(),
            "combiner": self.combiner,
            "guard": self.guard,
            "validation": _json_safe(self.validation_report),
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the guard existed have no fallback: they combine every task.
        state_dict.setdefault(prefix + "fallback", torch.full_like(self.fallback, -1))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_table(self) -> dict[str, dict[str, float]]:
        return {
            key: {m: float(self.weights[i, j]) for j, m in enumerate(self.member_names)}
            for i, key in enumerate(self.task.scores)
        }

    # ---- prediction ------------------------------------------------------------------------------
    @property
    def describes_new_perturbations(self) -> bool:  # type: ignore[override]
        return all(self.members[m].encoder.describes_new_perturbations for m in self.member_names)

    @property
    def new_perturbation_refusal(self) -> str:  # type: ignore[override]
        unable = [m for m in self.member_names if not self.members[m].encoder.describes_new_perturbations]
        return "; ".join(f"member {m}: {self.members[m].encoder.new_perturbation_refusal}" for m in unable)

    def extend_vocabulary(self, context: DataContext) -> None:
        for name in self.member_names:
            self.members[name].encoder.extend_vocabulary(context)
        self.context = context

    @torch.no_grad()
    def evidence(self, pert: np.ndarray, gene: np.ndarray) -> dict[str, list]:
        """Each member's scores (``<member>_p_de``, ``<member>_p_up_given_de``) and the members' own evidence."""
        pert, gene = np.asarray(pert), np.asarray(gene)
        names = {"de": "p_de", "dir": "p_up_given_de"}
        columns: dict[str, list] = {}
        for start in range(0, len(pert), 8192):  # batches: a screen has millions of pairs
            batch = {
                "pert": torch.as_tensor(pert[start : start + 8192], dtype=torch.long, device=self.weights.device),
                "gene": torch.as_tensor(gene[start : start + 8192], dtype=torch.long, device=self.weights.device),
            }
            for key, values in self.member_scores(batch).items():
                for j, member in enumerate(self.member_names):
                    columns.setdefault(f"{member}_{names[key]}", []).extend(values[:, j].cpu().numpy().tolist())
        for member in self.member_names:
            columns.update(self.members[member].encoder.evidence(pert, gene))
        return columns

    def combined_scores(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per task score: the guard's member where it fell back, else the pooled members."""
        out = {}
        for i, key in enumerate(self.task.scores):
            member = int(self.fallback[i])
            if member >= 0:
                out[key] = scores[key][:, member]
            elif self.combiner == "loglik":
                out[key] = scores[key] @ self.weights[i]
            else:
                p = scores[key].clamp(EPS, 1.0 - EPS)
                out[key] = torch.sigmoid((torch.log(p) - torch.log1p(-p)) @ self.weights[i])
        return out

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        probs = self.task.probabilities(self.combined_scores(self.member_scores(batch)))
        # Log-probabilities: the classifier's softmax gives these probabilities back.
        return torch.log(probs.clamp_min(1e-12)).float()
