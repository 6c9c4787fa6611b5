"""What a PerturbQA task means, in one place: its classes and their order, how labels are encoded and
class probabilities decoded into the scores the benchmark ranks by, which files it reads, which pairs score
each benchmark task, which metrics it reports, and how a prompt asks the question and words an outcome.

The benchmark has two scored tasks per dataset, ``de`` (is the downstream gene differentially expressed
after the knockdown?) and ``dir`` (for DE pairs: up or down?). A model learns one of three training
tasks (``data.task``): ``de``, ``dir``, or ``joint`` (three classes, not DE / down / up), which scores
both benchmark tasks from one model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

# Outcome codes of a training pair, whatever the task: what retrieval counts and prompts describe, and what
# each task's class label is derived from (``Task.class_of_outcome``).
NOT_DE, DOWN, UP, DE_UNKNOWN_DIRECTION = 0, 1, 2, 3

OUTCOME_WORDS = {NOT_DE: "unchanged", DOWN: "down", UP: "up", DE_UNKNOWN_DIRECTION: "changed"}
"""How prompts and evidence columns word an outcome code."""


def outcome_codes(de: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """0 not DE, 1 down, 2 up, 3 DE with no direction known (task ``de`` reads no direction file)."""
    de, direction = np.asarray(de), np.asarray(direction)
    return np.where(de != 1, NOT_DE, np.where(direction == 1, UP, np.where(direction == 0, DOWN, DE_UNKNOWN_DIRECTION)))


def scored_pairs(benchmark_task: str, de, direction):
    """Which pairs score ``benchmark_task`` and their 0/1 targets: every pair for ``de`` (target: DE or
    not), the pairs with a known direction for ``dir`` (the direction file covers DE pairs only; target: up).
    Works on numpy arrays and torch tensors alike; the metrics, the prediction files and the ensemble's
    validation fit all select pairs through it."""
    if benchmark_task == "de":
        return de >= 0, de
    if benchmark_task == "dir":
        return direction >= 0, direction
    raise ValueError(f"benchmark task must be de or dir, got {benchmark_task!r}")


@dataclass(frozen=True)
class Task:
    """One training task.

    Attributes:
        name: ``de``, ``dir`` or ``joint`` (the value of ``data.task``).
        classes: class names in the order of the label ids and of the model's logits.
        files: the dataset files it reads (``NAME-<kind>.csv``).
        scores: the benchmark tasks it scores (``joint`` scores both).
        de_pairs_only: trains and scores on DE-positive pairs only (``dir``).
        question: the prompt question of the LLM classifiers (``{pert}``, ``{gene}`` filled in).
        outcome_classes: the class id of each outcome code (``NOT_DE``, ``DOWN``, ``UP``,
            ``DE_UNKNOWN_DIRECTION``), -1 where the task has no class for it.
    """

    name: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    scores: tuple[str, ...]
    de_pairs_only: bool
    question: str
    outcome_classes: tuple[int, int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_of_outcome(self, codes: np.ndarray) -> np.ndarray:
        """Class ids of outcome codes under this task (-1: no class, e.g. a not-DE pair under ``dir``)."""
        return np.asarray(self.outcome_classes)[np.asarray(codes)]

    def encode_labels(self, de: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """Class ids from the file labels (``de`` 0/1; ``dir`` 1 up, 0 down, -1 not DE / unknown).

        de -> 0 not DE / 1 DE; dir -> 0 down / 1 up; joint -> 0 not DE / 1 down / 2 up.
        """
        if self.name == "de":
            return np.asarray(de).astype(np.int64)
        if self.name == "dir":
            return np.asarray(direction).astype(np.int64)
        return np.where(np.asarray(de) == 1, 1 + np.asarray(direction), 0).astype(np.int64)

    def decode(self, probabilities: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities -> the score of each benchmark task this task scores.

        joint: DE score = 1 - p(not DE); direction score = p(up) / (p(down) + p(up)). de: p(DE). dir: p(up).
        """
        if self.name == "joint":
            de = 1.0 - probabilities[:, 0]
            moving = probabilities[:, 1] + probabilities[:, 2]
            direction = probabilities[:, 2] / moving.clamp_min(1e-12)
            return {"de": de, "dir": direction}
        return {self.scores[0]: probabilities[:, 1]}

    def decode_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (or log-probabilities) -> the scores of ``decode(softmax(logits))``, in float64, computed from
        differences of logits: joint DE = sigmoid(logsumexp(down, up) - not DE), direction = sigmoid(up - down);
        de/dir: sigmoid(class 1 - class 0).

        Pairs whose compared logits are equal get exactly equal scores. Through a softmax they would not: its
        normaliser differs per pair and rounds differently, and that rounding would rank pairs that tie (e.g.
        the kNN vote's direction where no voter moved), moving a per-gene AUROC by whole hundredths."""
        logits = logits.double()
        if self.name == "joint":
            de = torch.sigmoid(torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0])
            return {"de": de, "dir": torch.sigmoid(logits[:, 2] - logits[:, 1])}
        return {self.scores[0]: torch.sigmoid(logits[:, 1] - logits[:, 0])}

    def probabilities(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of ``decode``: class probabilities whose decoded scores are ``scores``."""
        if self.name == "joint":
            de, up = scores["de"], scores["dir"]
            return torch.stack([1.0 - de, de * (1.0 - up), de * up], dim=1)
        p = scores[self.scores[0]]
        return torch.stack([1.0 - p, p], dim=1)


TASKS: dict[str, Task] = {
    "de": Task(
        "de",
        ("not_de", "de"),
        ("de",),
        ("de",),
        False,
        "Question: is {gene} differentially expressed after the knockdown of {pert}? Answer:",
        (0, 1, 1, 1),
    ),
    "dir": Task(
        "dir",
        ("down", "up"),
        ("de", "dir"),
        ("dir",),
        True,
        "Question: {gene} is differentially expressed after the knockdown of {pert}; does it go up or down? Answer:",
        (-1, 0, 1, -1),  # dir training pairs are all DE with a direction
    ),
    "joint": Task(
        "joint",
        ("not_de", "down", "up"),
        ("de", "dir"),
        ("de", "dir"),
        False,
        "Question: after the knockdown of {pert}, is {gene} unchanged, down or up? Answer:",
        (0, 1, 2, -1),
    ),
}
TASK_NAMES = tuple(TASKS)

QUESTIONS = {name: task.question for name, task in TASKS.items()}
"""The prompt question per task (a prompt's last line)."""


def get_task(name: str) -> Task:
    """The ``Task`` called ``name``; an unknown name is an error listing the valid ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"data.task must be one of {', '.join(TASK_NAMES)}, got {name!r}") from None


def encode_labels(de: np.ndarray, direction: np.ndarray, task: str) -> np.ndarray:
    """Class ids of ``task`` from the file labels (``Task.encode_labels``)."""
    return get_task(task).encode_labels(de, direction)


def decode_scores(probabilities: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    """Class probabilities -> the score of each benchmark task that ``task`` scores (``Task.decode``)."""
    return get_task(task).decode(probabilities)


HEADLINE_METRIC = "auroc_per_gene"
"""The official PerturbQA metric; each scored task reports ``{task}_auroc_per_gene``."""

BENCHMARK_TASKS = ("de", "dir")
"""The two scored tasks of every PerturbQA dataset (the ``task`` column of predictions)."""

GSE_TASK = "gse"
"""Gene set enrichment (data=k562_gse): name a cluster of genes; a generation task with its own runner
(perturb_models/gse), scored by ROUGE-1 recall of the label and BERTScore."""
GSE_METRICS = ("rouge1_recall", "bertscore_f1")

COMPARISON_METRICS = (
    tuple(f"{t}_{m}" for t in BENCHMARK_TASKS for m in ("auroc_per_gene", "genes_scored"))
    + tuple(f"{t}_{m}" for t in BENCHMARK_TASKS for m in ("auroc", "auprc"))
    + GSE_METRICS
)
"""Test metrics of a run's row in a comparison table, in column order (the pair tasks', then gene sets')."""


def headline_metrics(task: str) -> tuple[str, ...]:
    """The headline metric names a run of ``task`` reports, e.g. ``("de_auroc_per_gene", "dir_auroc_per_gene")``."""
    if task == GSE_TASK:
        return GSE_METRICS
    return tuple(f"{scored}_{HEADLINE_METRIC}" for scored in get_task(task).scores)


def primary_metric(task: str) -> str:
    """The validation metric a run selects on by default: DE per-gene AUROC, direction's for task=dir,
    ROUGE-1 recall for gene set enrichment (task=gse)."""
    return f"val/{headline_metrics(task)[0]}"


def decode_logits(logits: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    """Logits -> the score of each benchmark task that ``task`` scores, float64 (``Task.decode_logits``): how
    every model's pairs are scored."""
    return get_task(task).decode_logits(logits)
