"""What a PerturbQA task means, in one place: its classes and their order, how labels are encoded and
class probabilities decoded into the scores the benchmark ranks by, which files it reads, which metrics
it reports, and how a prompt asks the question.

The benchmark has two scored tasks per dataset, ``de`` (is the downstream gene differentially expressed
after the knockdown?) and ``dir`` (for DE pairs: up or down?). A model learns one of three training
tasks (``data.task``): ``de``, ``dir``, or ``joint`` (three classes, not DE / down / up), which scores
both benchmark tasks from one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
    """

    name: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    scores: tuple[str, ...]
    de_pairs_only: bool
    question: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


TASKS: dict[str, Task] = {
    "de": Task(
        "de",
        ("not_de", "de"),
        ("de",),
        ("de",),
        False,
        "Question: is {gene} differentially expressed after the knockdown of {pert}? Answer:",
    ),
    "dir": Task(
        "dir",
        ("down", "up"),
        ("de", "dir"),
        ("dir",),
        True,
        "Question: {gene} is differentially expressed after the knockdown of {pert}; does it go up or down? Answer:",
    ),
    "joint": Task(
        "joint",
        ("not_de", "down", "up"),
        ("de", "dir"),
        ("de", "dir"),
        False,
        "Question: after the knockdown of {pert}, is {gene} unchanged, down or up? Answer:",
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
    """Class ids of ``task`` from the file labels (``de`` 0/1; ``dir`` 1 up, 0 down, -1 not DE / unknown).

    de -> 0 not DE / 1 DE; dir -> 0 down / 1 up; joint -> 0 not DE / 1 down / 2 up.
    """
    task = get_task(task).name
    if task == "de":
        return np.asarray(de).astype(np.int64)
    if task == "dir":
        return np.asarray(direction).astype(np.int64)
    return np.where(np.asarray(de) == 1, 1 + np.asarray(direction), 0).astype(np.int64)


def decode_scores(probabilities: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    """Class probabilities -> the score of each benchmark task that ``task`` scores.

    joint: DE score = 1 - p(not DE); direction score = p(up) / (p(down) + p(up)). de: p(DE). dir: p(up).
    """
    task = get_task(task).name
    if task == "joint":
        de = 1.0 - probabilities[:, 0]
        moving = probabilities[:, 1] + probabilities[:, 2]
        direction = probabilities[:, 2] / moving.clamp_min(1e-12)
        return {"de": de, "dir": direction}
    if task == "de":
        return {"de": probabilities[:, 1]}
    return {"dir": probabilities[:, 1]}


HEADLINE_METRIC = "auroc_per_gene"
"""The official PerturbQA metric; each scored task reports ``{task}_auroc_per_gene``."""

BENCHMARK_TASKS = ("de", "dir")
"""The two scored tasks of every PerturbQA dataset (the ``task`` column of predictions)."""

COMPARISON_METRICS = tuple(f"{t}_{m}" for t in BENCHMARK_TASKS for m in ("auroc_per_gene", "genes_scored")) + tuple(
    f"{t}_{m}" for t in BENCHMARK_TASKS for m in ("auroc", "auprc")
)
"""Test metrics of a run's row in a comparison table, in column order."""


GSE_TASK = "gse"
"""Gene set enrichment (data=k562_gse): name a cluster of genes; a generation task with its own runner
(perturb_models/gse), scored by ROUGE-1 recall of the label and BERTScore."""
GSE_METRICS = ("rouge1_recall", "bertscore_f1")
COMPARISON_METRICS = COMPARISON_METRICS + GSE_METRICS


def headline_metrics(task: str) -> tuple[str, ...]:
    """The headline metric names a run of ``task`` reports, e.g. ``("de_auroc_per_gene", "dir_auroc_per_gene")``."""
    if task == GSE_TASK:
        return GSE_METRICS
    return tuple(f"{scored}_{HEADLINE_METRIC}" for scored in get_task(task).scores)


def primary_metric(task: str) -> str:
    """The validation metric a run selects on by default: DE per-gene AUROC, direction's for task=dir,
    ROUGE-1 recall for gene set enrichment (task=gse)."""
    return f"val/{headline_metrics(task)[0]}"
