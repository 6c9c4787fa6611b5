"""The one LightningModule every model trains with: an encoder from config, a head, a loss, the metrics."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch import nn

from perturb_models.calibration import calibration_metrics
from perturb_models.data.datamodule import PerturbQADataModule
from perturb_models.data.vocab import GeneVocab
from perturb_models.losses import within_gene_rank_loss
from perturb_models.metrics import metrics_from_predictions, prediction_frame
from perturb_models.models.base import all_reduce_mean, check_encoder, trainable_parameters
from perturb_models.runs import RECORD_KEY
from perturb_models.tasks import decode_logits, get_task

log = logging.getLogger(__name__)

# Validation/test metrics are computed from predictions gathered from every rank, so each rank logs the
# same value; Lightning's advice to all-reduce them (sync_dist=True) does not apply. Silenced only while
# this module evaluates (see _quiet_sync_advice).
_SYNC_ADVICE = r".*self\.log\('(val|test)/.*sync_dist=True.*"


class PerturbationClassifier(L.LightningModule):
    """Encoder + linear head + cross-entropy, for every model of the project.

    The encoder (a :class:`~perturb_models.models.base.Encoder`) maps a batch dict (``pert``, ``gene``
    index tensors, ...) to a pair representation with ``encoder.output_dim`` features, or, when
    ``encoder.produces_logits`` is true, straight to logits. A model with trainable parameters and no
    ``optimizer`` is an error: it would "train" without ever updating its weights.

    Args:
        encoder: the model-specific :class:`~perturb_models.models.base.Encoder`.
        vocab: the DataModule's vocabulary (to name genes in predictions).
        task: ``de``, ``dir`` or ``joint``; fixes the number of classes and how scores are read.
        optimizer: a partial ``torch.optim`` constructor (``_partial_: true`` in config).
        scheduler: an optional partial LR-scheduler constructor.
        scheduler_interval: ``epoch`` or ``step``.
        monitor: metric a plateau scheduler watches.
        class_weights: optional loss weight per class.
        rank_weight: weight of the within-gene ranking term added to the cross-entropy
            (:func:`perturb_models.losses.within_gene_rank_loss`; 0: cross-entropy only). It compares pairs
            of the same downstream gene in a batch, so it needs ``data.gene_group_size``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        vocab: GeneVocab,
        task: str,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        monitor: str | None = None,
        class_weights: list[float] | None = None,
        rank_weight: float = 0.0,
    ):
        super().__init__()
        self.encoder = encoder
        self.vocab = vocab
        self.task = task
        self.num_classes = get_task(task).num_classes
        check_encoder(encoder, self.num_classes)
        self.produces_logits = bool(encoder.produces_logits)
        self.head = nn.Identity() if self.produces_logits else nn.Linear(encoder.output_dim, self.num_classes)
        weight = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        if weight is not None and len(weight) != self.num_classes:
            raise ValueError(f"class_weights has {len(weight)} entries, task={task} has {self.num_classes} classes")
        self.loss_fn = nn.CrossEntropyLoss(weight=weight)
        if rank_weight < 0:
            raise ValueError(f"model.rank_weight must be >= 0, got {rank_weight}")
        self.rank_weight = float(rank_weight)
        trainable = trainable_parameters(self)
        if trainable and optimizer is None:
            raise ValueError(
                f"model.optimizer is null, but {type(encoder).__name__} (+ head) has {trainable:,} trainable "
                "parameters: they would never be updated. Give an optimizer (conf/model/_base.yaml has the default), "
                "or freeze them"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.monitor = monitor
        # Encoders that backward each micro-batch as they go (the LLM) drive the step themselves.
        self.automatic_optimization = not encoder.accumulates_gradients
        self.run_record: dict[str, Any] = {}
        # Per-task Platt calibrators fitted on validation (perturb_models.calibration); None: uncalibrated.
        self.calibrators: dict[str, dict[str, Any]] | None = None
        self.stage_metrics: dict[str, dict[str, float]] = {}
        self.stage_predictions: dict[str, pd.DataFrame] = {}
        self._outputs: dict[str, list[dict[str, torch.Tensor]]] = {}
        self._warning_scope: warnings.catch_warnings | None = None

    def setup(self, stage: str) -> None:
        # Encoders that precompute per-pair inputs (the LLM's tokenised prompts) do it once per split here.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.encoder.prepare_datamodule(datamodule)

    def _quiet_sync_advice(self, on: bool) -> None:
        # From the start of an evaluation loop to its end (after the callbacks read the metrics).
        if on and self._warning_scope is None:
            self._warning_scope = warnings.catch_warnings()
            self._warning_scope.__enter__()
            warnings.filterwarnings("ignore", message=_SYNC_ADVICE)
        elif not on and self._warning_scope is not None:
            self._warning_scope.__exit__(None, None, None)
            self._warning_scope = None

    def on_validation_start(self) -> None:
        self._quiet_sync_advice(True)

    def on_validation_end(self) -> None:
        self._quiet_sync_advice(False)

    def on_test_start(self) -> None:
        self._quiet_sync_advice(True)

    def on_test_end(self) -> None:
        self._quiet_sync_advice(False)

    # ---- forward / loss --------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder(batch))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if not self.automatic_optimization:
            return self._accumulating_step(batch)
        logits = self(batch)
        loss = self.loss_fn(logits.float(), batch["label"])
        rank_term = self._rank_term(batch)
        if rank_term is not None:
            loss = loss + rank_term(logits)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["label"]))
        if not loss.requires_grad:
            return None  # an encoder with nothing to fit (retrieval): no backward pass
        return loss

    def _rank_term(self, batch: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The weighted within-gene ranking loss of this batch's logits, or None when ``rank_weight`` is 0."""
        if self.rank_weight == 0:
            return None
        labels, genes, weight = batch["label"], batch["gene"], self.rank_weight
        return lambda logits: weight * within_gene_rank_loss(logits, labels, genes, self.task)

    def _accumulating_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Manual optimisation: the encoder runs forward and backward per micro-batch (memory of one
        micro-batch), then one optimizer step. Under DDP the gradients are averaged once per step here
        (the encoder's ``average_gradients``, then the head's), because ranks may cut their batches into
        different numbers of micro-batches."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        loss = self.encoder.accumulate(batch, self.loss_fn, self.manual_backward, self._rank_term(batch))
        if self.trainer.world_size > 1:
            self.encoder.average_gradients(self.trainer.world_size)
            all_reduce_mean(self.head.parameters(), self.trainer.world_size)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.scheduler_interval == "step":
            scheduler.step()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["label"]))

    def on_train_start(self) -> None:
        # Manual optimisation averages gradients itself (see _accumulating_step): DDP's reducer must not
        # wait for a matching number of backward passes on every rank.
        ddp = getattr(self.trainer.strategy, "model", None)
        if not self.automatic_optimization and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            ddp.require_backward_grad_sync = False

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            scheduler = self.lr_schedulers()
            if scheduler is not None and self.scheduler_interval == "epoch":
                metric = self.trainer.callback_metrics.get(self.monitor) if self.monitor else None
                scheduler.step(metric) if isinstance(
                    scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
                ) else scheduler.step()
        # Nothing trainable: one pass writes the checkpoint; further epochs would repeat it exactly.
        if self.trainer is not None and not any(p.requires_grad for p in self.parameters()):
            self.trainer.should_stop = True

    def _collect(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        logits = self(batch).float()
        self._outputs.setdefault(stage, []).append(
            {
                "logits": logits.detach(),  # scored at the epoch's end by decode_logits (ties kept exact)
                "pert": batch["pert"],
                "gene": batch["gene"],
                "de": batch["de"],
                "dir": batch["dir"],
                "loss": (self.loss_fn(logits, batch["label"]).detach() * len(batch["label"])).view(1),
            }
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._collect("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._collect("test", batch)

    # ---- epoch-end metrics -----------------------------------------------------------------------
    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-rank tensor of any length from every rank (padded for the collective)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return tensor
        length = torch.tensor([tensor.shape[0]], device=tensor.device)
        lengths = self.all_gather(length).view(-1).tolist()
        padded = torch.zeros((max(lengths),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = self.all_gather(padded)
        return torch.cat([gathered[r, :n] for r, n in enumerate(lengths)])

    def _empty_outputs(self) -> dict[str, torch.Tensor]:
        long = dict(dtype=torch.long, device=self.device)
        return {
            "logits": torch.zeros((0, self.num_classes), device=self.device),
            "pert": torch.zeros(0, **long),
            "gene": torch.zeros(0, **long),
            "de": torch.zeros(0, **long),
            "dir": torch.zeros(0, **long),
            "loss": torch.zeros(0, device=self.device),
        }

    def _finish_epoch(self, stage: str) -> None:
        outputs = self._outputs.pop(stage, [])
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if not outputs and not distributed:
            return
        if outputs:
            merged = {key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}
        else:
            # A rank with an empty shard must still join the gathers, or the other ranks wait forever.
            merged = self._empty_outputs()
        merged = {key: self._gather(value).cpu() for key, value in merged.items()}
        if len(merged["pert"]) == 0:
            return
        scores = {k: v.numpy() for k, v in decode_logits(merged["logits"], self.task).items()}
        frame = prediction_frame(
            self.vocab.decode(merged["pert"].tolist()),
            self.vocab.decode(merged["gene"].tolist()),
            merged["de"].numpy(),
            merged["dir"].numpy(),
            scores,
        )
        metrics = metrics_from_predictions(frame, stage)
        metrics[f"{stage}/loss"] = float(merged["loss"].sum() / len(merged["pert"]))  # sum of per-batch means x sizes
        self.stage_metrics[stage] = metrics
        self.stage_predictions[stage] = frame
        if self.trainer is not None and not self.trainer.sanity_checking:
            headline = {k: v for k, v in metrics.items() if k.endswith("_auroc_per_gene")}
            self.log_dict(headline, prog_bar=True)
            self.log_dict({k: v for k, v in metrics.items() if k not in headline})

    def on_validation_epoch_end(self) -> None:
        self._finish_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._finish_epoch("test")
        if self.calibrators and "test" in self.stage_predictions and "test" in self.stage_metrics:
            # Brier and ECE of the scores before and after calibration (ranking metrics are unchanged by it).
            self.stage_metrics["test"].update(
                calibration_metrics(self.stage_predictions["test"], self.calibrators, "test")
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        subset = datamodule.gene_subset("test") if isinstance(datamodule, PerturbQADataModule) else None
        if subset is not None and "test" in self.stage_metrics:
            # A subset's AUROC must not pass for the official full-test figure.
            note, genes = subset
            self.stage_metrics["test"]["test/genes_subset"] = float(genes)
            log.warning("test metrics scored on a gene subset: %s", note)

    # ---- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None  # nothing to fit (retrieval); __init__ rejects trainable parameters without an optimizer
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": self.scheduler_interval}
        if self.monitor and self.automatic_optimization:
            # Manual optimisation (the LLM) steps its scheduler itself and reads the monitor there.
            scheduler["monitor"] = self.monitor
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ---- checkpoint record -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = dict(self.run_record, vocab=self.vocab.symbols)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(RECORD_KEY, {}).get("vocab")
        if saved is not None and saved != self.vocab.symbols:
            raise ValueError(
                "checkpoint vocabulary differs from the DataModule's; rebuild the data from the checkpoint's record"
            )
