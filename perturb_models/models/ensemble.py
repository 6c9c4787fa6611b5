"""``model=ensemble``: stacking of member models' class probabilities, weights fitted on validation only.

Each member is an ordinary model of the project (its config from ``conf/model/``). When the ensemble is
fitted (the setup of its first ``trainer.fit``), every member is either

- trained by the project's own ``perturb_models.training.train`` into ``<run>/members/<name>`` (same data,
  seed and validation split as the ensemble; its trainer and callbacks, plus ``member_overrides.<name>``), or
- loaded from a finished run of that member (``member_runs.<name>``: a run folder or checkpoint of the same
  dataset, seed and validation split), which costs no training.

Then the members are frozen and the combination is fitted on the validation perturbations only: per task
score (DE, and direction on DE pairs), a convex weighting of the members' scores,

    s(p, g) = sum_m w_m s_m(p, g),   w_m >= 0,  sum_m w_m = 1,

that maximises the validation log-likelihood of the mixture (EM for mixture weights: concave, so a unique
optimum without a learning rate or a regulariser; a one-member ensemble is that member exactly; the output
stays a probability). Why not a logistic combiner: its free scale and intercept buy nothing for a ranking
metric (per-gene AUROC), its unconstrained weights can go negative on correlated members, and it would need
a regulariser tuned on the very validation set it is fitted on. Test labels are never read here.

The ensemble's checkpoint holds every member's weights and the combination weights; ``evaluate.py``
rebuilds the members from ``catalog`` (the members' model configs, stored in the ensemble's config) and
loads them from the checkpoint alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from perturb_models.data.datamodule import DataContext
from perturb_models.models.base import Encoder
from perturb_models.tasks import decode_scores

log = logging.getLogger(__name__)

SCORE_KEYS = {"joint": ("de", "dir"), "de": ("de",), "dir": ("dir",)}


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
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


class EnsembleEncoder(Encoder):
    """Frozen member models combined per task score by convex weights fitted on validation pairs.

    Args:
        members: names of the members, each a key of ``catalog``.
        catalog: model configs (as under ``conf/model/``) the members are built from.
        member_runs: optional name -> finished run folder or checkpoint to load instead of training.
        member_overrides: optional name -> config merged into that member's training config
            (e.g. ``{data: {batch_size: 1024}, trainer: {max_epochs: 12}}``).
        run: the ensemble run's data, trainer, callbacks, seed, output_dir and optimized_metric (the members
            train under them; interpolated from the root config by conf/model/ensemble.yaml).
    """

    produces_logits = True

    def __init__(self, context: DataContext, members: Sequence[str], catalog: Mapping[str, Any],
                 member_runs: Mapping[str, str] | None = None, member_overrides: Mapping[str, Any] | None = None,
                 run: Mapping[str, Any] | None = None):
        super().__init__()
        from perturb_models.builders import build_model

        members, catalog = list(_plain(members) or []), _plain(catalog) or {}
        if not members:
            raise ValueError("model.encoder.members is empty: list at least one model (e.g. [knn, gears])")
        if len(set(members)) != len(members):
            raise ValueError(f"model.encoder.members lists a model twice: {members}")
        absent = [m for m in members if m not in catalog]
        if absent:
            raise ValueError(f"model.encoder.members lists {absent[0]!r}, which is not in model.encoder.catalog "
                             f"(has {', '.join(catalog)}); add it with +model@model.encoder.catalog.{absent[0]}={absent[0]}")
        self.task = context.task
        self.context = context
        self.member_names = members
        self.member_configs = {m: catalog[m] for m in members}
        self.member_runs = dict(_plain(member_runs) or {})
        unknown = [m for m in self.member_runs if m not in members]
        if unknown:
            raise ValueError(f"model.encoder.member_runs names {unknown[0]!r}, which is not a member ({', '.join(members)})")
        self.member_overrides = dict(_plain(member_overrides) or {})
        self.run = dict(_plain(run) or {})
        shell = SimpleNamespace(context=context)
        metric = self.run.get("optimized_metric")
        self.members = nn.ModuleDict({
            m: build_model(OmegaConf.create({"model": self.member_configs[m], "optimized_metric": metric}), shell)
            for m in members
        })
        # Members are fitted by their own runs and then fixed: the ensemble itself trains no parameter
        # (its weights are fitted on validation in prepare_datamodule), so it needs no optimizer.
        for parameter in self.members.parameters():
            parameter.requires_grad_(False)
        keys = SCORE_KEYS[self.task]
        self.register_buffer("weights", torch.full((len(keys), len(members)), 1.0 / len(members), dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.output_dim = context.num_classes

    def train(self, mode: bool = True) -> "EnsembleEncoder":
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
        for name in self.member_names:
            source = self.member_runs.get(name) or self._train_member(name)
            self._load_member(name, source)
        self.fit_weights(datamodule.val_dataloader())

    def _train_member(self, name: str) -> Path:
        """Train one member with the project's ``train`` into ``<run>/members/<name>``; its run folder."""
        import torch.distributed as dist

        from perturb_models.training import train

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(f"model=ensemble cannot train member {name!r} inside a multi-process run; train it "
                               f"first and pass +model.encoder.member_runs.{name}=<its run folder>")
        missing = [k for k in ("data", "trainer", "callbacks", "seed", "output_dir") if k not in self.run]
        if missing:
            raise ValueError(f"model.encoder.run lacks {', '.join(missing)}: the ensemble cannot train its members")
        out = Path(self.run["output_dir"]) / "members" / name
        cfg = OmegaConf.create({
            "model": self.member_configs[name], "data": self.run["data"], "trainer": self.run["trainer"],
            "callbacks": self.run["callbacks"], "logger": {}, "paths": {"output_dir": str(out)},
            "seed": self.run["seed"], "optimized_metric": self.run.get("optimized_metric"), "ckpt_path": None,
        })
        cfg = OmegaConf.merge(cfg, OmegaConf.create(self.member_overrides.get(name) or {}))
        # The ensemble's own callbacks point at its checkpoints/ folder; a member writes into its own.
        cfg.trainer.default_root_dir = str(out)
        for callback in cfg.callbacks.values():
            if callback is not None and "dirpath" in callback:
                callback.dirpath = str(out / "checkpoints")
        log.info("ensemble: training member %s into %s", name, out)
        train(cfg)
        return out

    def _load_member(self, name: str, source: str | Path) -> None:
        from perturb_models.evaluation import find_checkpoint, load_run_record

        ckpt_file = find_checkpoint(source)
        checkpoint, record = load_run_record(ckpt_file)
        where = f"member {name!r} ({ckpt_file})"
        if record.get("vocab") != list(self.context.vocab.symbols):
            raise ValueError(f"{where} was trained on another gene vocabulary (another dataset?) than this run's")
        if list(record.get("val_perts", [])) != list(self.context.val_perts):
            raise ValueError(f"{where} used other validation perturbations than this run (another seed or "
                             f"val_fraction?); its validation predictions would not be held out")
        saved = record["config"]["model"]["encoder"]
        wanted = _plain(self.member_configs[name]["encoder"])
        if saved != wanted:
            differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ValueError(f"{where} was trained with another encoder config than model.encoder.catalog.{name} "
                             f"(differs in {', '.join(differ)}); set the catalog entry to the run's recipe")
        self.members[name].load_state_dict(checkpoint["state_dict"])
        log.info("ensemble: member %s loaded from %s", name, ckpt_file)

    @torch.no_grad()
    def member_scores(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per task score key: (B, M) member scores in float64."""
        per_member = [decode_scores(torch.softmax(self.members[m](batch).float(), dim=-1), self.task)
                      for m in self.member_names]
        return {k: torch.stack([s[k] for s in per_member], dim=1).double() for k in SCORE_KEYS[self.task]}

    @torch.no_grad()
    def fit_weights(self, loader) -> None:
        """Fit the convex weights per task score on the validation pairs of ``loader`` (no test label read)."""
        was_training = self.training
        self.eval()
        scores = {k: [] for k in SCORE_KEYS[self.task]}
        labels = {k: [] for k in SCORE_KEYS[self.task]}
        for batch in loader:
            batch = {k: v.to(self.weights.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            member = self.member_scores(batch)
            for key in scores:
                if self.task == "joint" and key == "dir":
                    # Direction is scored on DE pairs whose direction is known, as in the metrics.
                    keep = (batch["de"] == 1) & (batch["dir"] >= 0)
                    target = batch["dir"]
                elif self.task == "joint":
                    keep, target = torch.ones_like(batch["de"], dtype=torch.bool), batch["de"]
                else:
                    keep, target = torch.ones_like(batch["label"], dtype=torch.bool), batch["label"]
                scores[key].append(member[key][keep].cpu())
                labels[key].append(target[keep].cpu())
        for i, key in enumerate(SCORE_KEYS[self.task]):
            w = fit_convex_weights(torch.cat(scores[key]).numpy(), torch.cat(labels[key]).numpy())
            self.weights[i] = torch.as_tensor(w, dtype=self.weights.dtype)
            log.info("ensemble: %s weights %s (fitted on %d validation pairs)", key,
                     ", ".join(f"{m}={v:.3f}" for m, v in zip(self.member_names, w)), len(torch.cat(labels[key])))
        self.fitted.fill_(True)
        self.train(was_training)
        if self.run.get("output_dir"):
            from perturb_models.io import atomic_write_json

            atomic_write_json(Path(self.run["output_dir"]) / "ensemble_weights.json", self.weight_table())

    def weight_table(self) -> dict[str, dict[str, float]]:
        return {key: {m: float(self.weights[i, j]) for j, m in enumerate(self.member_names)}
                for i, key in enumerate(SCORE_KEYS[self.task])}

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
            batch = {"pert": torch.as_tensor(pert[start:start + 8192], dtype=torch.long, device=self.weights.device),
                     "gene": torch.as_tensor(gene[start:start + 8192], dtype=torch.long, device=self.weights.device)}
            for key, values in self.member_scores(batch).items():
                for j, member in enumerate(self.member_names):
                    columns.setdefault(f"{member}_{names[key]}", []).extend(values[:, j].cpu().numpy().tolist())
        for member in self.member_names:
            columns.update(self.members[member].encoder.evidence(pert, gene))
        return columns

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scores = self.member_scores(batch)
        combined = {k: scores[k] @ self.weights[i] for i, k in enumerate(SCORE_KEYS[self.task])}
        if self.task == "joint":
            de, up = combined["de"], combined["dir"]
            probs = torch.stack([1.0 - de, de * (1.0 - up), de * up], dim=1)
        else:
            p = combined[self.task]
            probs = torch.stack([1.0 - p, p], dim=1)
        # Log-probabilities: the classifier's softmax gives these probabilities back.
        return torch.log(probs.clamp_min(1e-12)).float()
