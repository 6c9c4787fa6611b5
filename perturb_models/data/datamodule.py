"""The one DataModule every model trains on: PerturbQA pairs as whole-split integer tensors."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from perturb_models.data.perturbqa import (
    PERTURBQA_ENSEMBL_MAP,
    DataValidationError,
    TaskTables,
    ensure_task_files,
    load_task_tables,
    read_cluster_mapping,
    read_ensembl_map,
    validate_tables,
)
from perturb_models.data.synthetic import make_synthetic_tables
from perturb_models.data.vocab import GeneVocab
from perturb_models.io import atomic_write_json
from perturb_models.tasks import encode_labels, get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataContext:
    """What models may know about the data, read-only: dimensions, symbols, dataset facts and the training pairs.

    ``train_pairs`` holds the training perturbations only (validation and test removed), with columns
    ``pert, gene`` (symbols), ``pert_idx, gene_idx`` (vocab indices), ``de`` (0/1) and ``dir``
    (1 up, 0 down, -1 not DE or unknown). Graphs and retrieval built from labels must use only this.
    ``clusters`` maps the vocab symbols that name gene clusters (k562_set's downstream "genes") to their
    member symbols; ``cell_line`` is named in LLM prompts; ``source`` says where the pairs came from.
    ``ensembl_ids`` maps the dataset's symbols (vocab and cluster members) to Ensembl gene ids, for the
    knowledge files' symbol resolution (``SymbolResolver.resolve_many``); empty when the dataset has none.
    Everything a model needs from the dataset is here, so knowledge code never reads data files.
    """

    dataset: str
    task: str
    vocab: GeneVocab
    train_pairs: pd.DataFrame
    train_perts: tuple[str, ...]
    val_perts: tuple[str, ...]
    test_perts: tuple[str, ...]
    cell_line: str = ""
    clusters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""
    ensembl_ids: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return get_task(self.task).num_classes

    @property
    def num_genes(self) -> int:
        return len(self.vocab)


def merge_task_tables(tables: TaskTables, task: str) -> pd.DataFrame:
    """One row per scored pair with columns pert, gene, split, de, dir (dir -1 where not DE / unknown)."""
    de = tables.de.rename(columns={"label": "de"})
    if tables.dir is None:
        pairs = de.assign(dir=-1)
    else:
        direction = tables.dir.loc[:, ["pert", "gene", "label"]].rename(columns={"label": "dir"})
        pairs = de.merge(direction, on=["pert", "gene"], how="left")
        pairs["dir"] = pairs["dir"].fillna(-1).astype(np.int64)
        # A DE pair with no direction row cannot be scored for direction nor trained in joint mode.
        unlabelled = (pairs["de"] == 1) & (pairs["dir"] < 0)
        if unlabelled.any() and "dir" in get_task(task).files:
            row = pairs.loc[unlabelled].iloc[0]
            raise DataValidationError(
                f"{tables.source}: DE pair (pert={row['pert']}, gene={row['gene']}) has no row in "
                f"{tables.name}-dir.csv ({int(unlabelled.sum())} such pairs); task={task} needs a direction for "
                f"every DE pair"
            )
    if get_task(task).de_pairs_only:
        pairs = pairs.loc[pairs["de"] == 1]
    return pairs.reset_index(drop=True)


def carve_validation_perts(train_perts: Sequence[str], val_fraction: float, seed: int) -> list[str]:
    """A seeded, perturbation-disjoint validation subset of the training perturbations."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    perts = sorted(train_perts)
    n_val = max(1, int(round(val_fraction * len(perts))))
    if n_val >= len(perts):
        raise ValueError(f"data.val_fraction={val_fraction} leaves no training perturbation ({len(perts)} in train)")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(perts, size=n_val, replace=False).tolist())


def scorable_genes(frame: pd.DataFrame, task: str) -> np.ndarray:
    """Genes (sorted) whose per-gene AUROC is defined: both DE classes (de), both directions among DE
    pairs (dir), both (joint)."""
    de_ok = frame.groupby("gene")["de"].nunique() == 2
    moving = frame.loc[frame["de"] == 1]
    dir_ok = moving.loc[moving["dir"] >= 0].groupby("gene")["dir"].nunique() == 2
    de_genes, dir_genes = set(de_ok.index[de_ok]), set(dir_ok.index[dir_ok])
    scorable = {"de": de_genes, "dir": dir_genes}
    genes = set.intersection(*(scorable[scored] for scored in get_task(task).scores))
    return np.array(sorted(genes), dtype=object)


class PairTensors(Dataset):
    """Whole-split tensors; indexing with a LongTensor of rows returns a ready batch dict."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError("all split tensors must have the same length")
        self.tensors = dict(tensors)
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: value[rows] for key, value in self.tensors.items()}


def gene_runs(
    genes: torch.Tensor, labels: torch.Tensor, group_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """The rows cut into runs of at most ``group_size`` rows of one downstream gene, in random order.

    A gene with n rows gets ceil(n / group_size) runs. Its rows are shuffled, then dealt round-robin, class
    by class, into its runs, so each class is spread as evenly as it can be: a gene with both outcomes has
    both in as many of its runs as it can, and a ranking term between pairs of the same gene finds pairs to
    compare in nearly every run of such a gene. Every row is in exactly one run.
    """
    order = torch.randperm(len(genes), generator=generator)
    # Stable sorts: by label within gene, both keeping the shuffled order among equals.
    order = order[torch.argsort(labels[order], stable=True)]
    order = order[torch.argsort(genes[order], stable=True)]
    sorted_genes = genes[order]
    starts = torch.ones(len(order), dtype=torch.bool)
    starts[1:] = sorted_genes[1:] != sorted_genes[:-1]
    first = torch.nonzero(starts).flatten()
    sizes = torch.diff(torch.cat([first, torch.tensor([len(order)])]))
    runs: list[torch.Tensor] = []
    for start, size in zip(first.tolist(), sizes.tolist()):
        rows = order[start : start + size]
        count = math.ceil(size / group_size)
        # Run r gets the class-sorted rows r, r + count, r + 2 * count, ...
        runs.extend(rows[r::count] for r in range(count))
    return [runs[r] for r in torch.randperm(len(runs), generator=generator).tolist()]


def gene_grouped_order(
    genes: torch.Tensor, labels: torch.Tensor, group_size: int, generator: torch.Generator
) -> torch.Tensor:
    """A permutation of the rows made of :func:`gene_runs` one after another."""
    runs = gene_runs(genes, labels, group_size, generator)
    return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.long)


class SplitBatchSampler:
    """Yields index tensors, one per batch: a seeded shuffle per epoch, sharded over DDP ranks.

    Training shards are cut to equal length on every rank (at most ``world_size - 1`` pairs per epoch
    are left out) so that gradient synchronisation never waits on a rank with fewer batches. Evaluation
    shards cover every pair exactly once. With ``genes``, ``labels`` and ``group_size`` (training only) the
    shuffle keeps runs of ``group_size`` pairs of one downstream gene together (:func:`gene_grouped_order`),
    and ranks get whole batches in turn rather than every ``world_size``-th pair, so that runs stay whole.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        equal_shards: bool = False,
        genes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        group_size: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if group_size and (genes is None or labels is None or len(genes) != num_rows or len(labels) != num_rows):
            raise ValueError("group_size needs the gene and the label of every row")
        self.num_rows, self.batch_size, self.shuffle, self.seed = num_rows, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size, self.equal_shards = drop_last, rank, world_size, equal_shards
        self.genes, self.labels, self.group_size = genes, labels, int(group_size) if shuffle else 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            if self.group_size:
                order = gene_grouped_order(self.genes, self.labels, self.group_size, generator)
            else:
                order = torch.randperm(self.num_rows, generator=generator)
        else:
            order = torch.arange(self.num_rows)
        if self.world_size > 1:
            if self.equal_shards:
                order = order[: (self.num_rows // self.world_size) * self.world_size]
            if self.group_size:
                # Whole batches in turn (batch b of a round goes to rank b), the last partial round strided,
                # so every rank gets as many rows as without grouping.
                rounds = len(order) // (self.batch_size * self.world_size)
                whole = rounds * self.batch_size * self.world_size
                head = order[:whole].view(rounds, self.world_size, self.batch_size)[:, self.rank].reshape(-1)
                return torch.cat([head, order[whole:][self.rank :: self.world_size]])
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self._shard()
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def __len__(self) -> int:
        rows = self.num_rows
        if self.world_size > 1:
            rows = (
                rows // self.world_size if self.equal_shards else len(range(self.rank, self.num_rows, self.world_size))
            )
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)


class PerturbQADataModule(L.LightningDataModule):
    """PerturbQA pairs for one dataset and task.

    Args:
        name: dataset name (k562, rpe1, hepg2, jurkat, k562_set, synthetic, or your own files' NAME).
        task: ``de``, ``dir`` or ``joint`` (3 classes: not DE / down / up).
        root: folder of the CSV files; None -> ``$PERTURBQA_DATA`` -> user cache (downloaded if missing).
        val_fraction: share of training perturbations held out for validation (seeded, perturbation-disjoint).
        split_file: a ``split.json`` written by an earlier run; reuses its validation perturbations.
        synthetic: generator options when ``name == 'synthetic'``.
        vocab / val_perts: restore an exact earlier setup (used when rebuilding from a checkpoint).
        max_train_perts: fit on a seeded subset of at most this many training perturbations (all their
            pairs); ``context.train_pairs`` (what graphs and retrieval read) keeps every training pair.
        test_genes / val_genes: score a seeded subset of this many genes of the test / validation split,
            with all their pairs, drawn among the genes whose per-gene AUROC is defined for the task (both
            classes; for ``joint`` both DE classes and both directions). Not the official figure: the full
            test split (null, the default) is.
        subset_seed: seed of those subsets, apart from ``seed`` so that runs of several seeds (and models)
            score the same genes (paired comparisons).
        ensembl_map: a JSON file symbol -> Ensembl gene id (a name in the data folder, downloaded with the
            dataset, or a path; null: none). It settles symbols gene_info cannot: ``SARS`` names SARS1 and
            SARS2, ``HIST1H2BC`` two histone genes. Unsettled ones stay without knowledge, and are logged.
        gene_group_size: 0 (a plain shuffle), or build training batches from runs of this many pairs of the
            same downstream gene (:func:`gene_grouped_order`), for the within-gene ranking term
            (``model.rank_weight``). Every training pair is still seen once an epoch.
    """

    def __init__(
        self,
        name: str = "k562",
        task: str = "joint",
        root: str | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 1024,
        eval_batch_size: int = 8192,
        seed: int = 0,
        download: bool = True,
        base_url: str | None = None,
        split_file: str | None = None,
        synthetic: Mapping[str, Any] | None = None,
        vocab: Sequence[str] | None = None,
        val_perts: Sequence[str] | None = None,
        cell_line: str | None = None,
        max_train_perts: int | None = None,
        test_genes: int | None = None,
        val_genes: int | None = None,
        subset_seed: int = 0,
        ensembl_map: str | None = PERTURBQA_ENSEMBL_MAP,
        gene_group_size: int = 0,
    ):
        super().__init__()
        get_task(task)  # an unknown task fails here, naming the valid ones
        self.name, self.task, self.root = name, task, root
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.download, self.base_url, self.split_file = download, base_url, split_file
        self.synthetic = dict(synthetic or {})
        self.cell_line = cell_line or name
        self._fixed_vocab = list(vocab) if vocab is not None else None
        self._fixed_val_perts = list(val_perts) if val_perts is not None else None
        for option, value in (
            ("max_train_perts", max_train_perts),
            ("test_genes", test_genes),
            ("val_genes", val_genes),
        ):
            if value is not None and int(value) < 1:
                raise ValueError(f"data.{option} must be a positive number or null, got {value}")
        self.max_train_perts = int(max_train_perts) if max_train_perts is not None else None
        self.subset_genes = {
            "test": int(test_genes) if test_genes is not None else None,
            "val": int(val_genes) if val_genes is not None else None,
        }
        self.subset_seed = int(subset_seed)
        if int(gene_group_size) < 0 or int(gene_group_size) == 1:
            raise ValueError(f"data.gene_group_size must be 0 (off) or at least 2, got {gene_group_size}")
        self.gene_group_size = int(gene_group_size)
        self.ensembl_map = ensembl_map
        self.subset_notes: dict[str, str] = {}
        self.splits: dict[str, PairTensors] = {}
        self.frames: dict[str, pd.DataFrame] = {}
        self.context: DataContext | None = None

    # ---- files -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.name != "synthetic":
            ensure_task_files(
                self.name,
                get_task(self.task).files,
                root=self.root,
                base_url=self.base_url,
                allow_download=self.download,
            )

    def load_tables(self) -> TaskTables:
        if self.name == "synthetic":
            de, dir_ = make_synthetic_tables(**self.synthetic)
            return validate_tables(
                "synthetic", de, dir_ if "dir" in get_task(self.task).files else None, source="<synthetic>"
            )
        return load_task_tables(
            self.name, self.task, root=self.root, base_url=self.base_url, allow_download=self.download
        )

    # ---- splits ----------------------------------------------------------------------------------
    def _validation_perts(self, train_perts: Sequence[str]) -> list[str]:
        if self._fixed_val_perts is not None:
            chosen = list(self._fixed_val_perts)
        elif self.split_file:
            path = Path(os.path.expanduser(self.split_file))
            if not path.is_file():
                raise FileNotFoundError(f"data.split_file={self.split_file}: no such file")
            saved = json.loads(path.read_text())
            if saved.get("dataset") not in (None, self.name):
                raise DataValidationError(
                    f"{path}: split was saved for dataset {saved.get('dataset')!r}, not {self.name!r}"
                )
            chosen = list(saved["val_perts"])
        else:
            return carve_validation_perts(train_perts, self.val_fraction, self.seed)
        unknown = sorted(set(chosen) - set(train_perts))
        if unknown:
            raise DataValidationError(
                f"validation perturbation {unknown[0]!r} is not a training perturbation of {self.name} "
                f"({len(unknown)} such); a validation split is carved from train only"
            )
        return sorted(chosen)

    def setup(self, stage: str | None = None) -> None:
        if self.context is not None:
            return
        tables = self.load_tables()
        pairs = merge_task_tables(tables, self.task)
        symbols_seen = GeneVocab.from_symbols(tables.de["pert"], tables.de["gene"])
        if self._fixed_vocab is not None:
            vocab = GeneVocab(self._fixed_vocab)
            missing = [s for s in symbols_seen.symbols if s not in vocab]
            if missing:
                raise DataValidationError(
                    f"{len(missing)} symbol(s) of {self.name} (e.g. {missing[0]!r}) are not in the saved vocabulary; "
                    "the data changed since the checkpoint was written"
                )
        else:
            vocab = symbols_seen
        train_perts = sorted(pairs.loc[pairs["split"] == "train", "pert"].unique())
        val_perts = self._validation_perts(train_perts)
        val_set = set(val_perts)
        stage_of = np.where(pairs["split"] == "test", "test", np.where(pairs["pert"].isin(val_set), "val", "train"))
        pairs = pairs.assign(stage=stage_of, pert_idx=vocab.encode(pairs["pert"]), gene_idx=vocab.encode(pairs["gene"]))
        pairs["label"] = encode_labels(pairs["de"].to_numpy(), pairs["dir"].to_numpy(), self.task)
        context_train = pairs.loc[pairs["stage"] == "train"].reset_index(drop=True)
        for stage_name in ("train", "val", "test"):
            frame = pairs.loc[pairs["stage"] == stage_name].reset_index(drop=True)
            if frame.empty:
                raise DataValidationError(f"{self.name}: the {stage_name} split is empty for task={self.task}")
            frame = self._subset(stage_name, frame)
            self.frames[stage_name] = frame
            self.splits[stage_name] = PairTensors(
                {
                    "pert": torch.as_tensor(frame["pert_idx"].to_numpy(), dtype=torch.long),
                    "gene": torch.as_tensor(frame["gene_idx"].to_numpy(), dtype=torch.long),
                    "label": torch.as_tensor(frame["label"].to_numpy(), dtype=torch.long),
                    "de": torch.as_tensor(frame["de"].to_numpy(), dtype=torch.long),
                    "dir": torch.as_tensor(frame["dir"].to_numpy(), dtype=torch.long),
                }
            )
        train = context_train
        mapping = read_cluster_mapping(tables.folder, self.name) if tables.folder is not None else {}
        ensembl_ids: dict[str, str] = {}
        if self.ensembl_map and tables.folder is not None:
            wanted = set(vocab.symbols) | {m for members in mapping.values() for m in members}
            ensembl = read_ensembl_map(tables.folder, self.ensembl_map, self.base_url, self.download)
            ensembl_ids = {s: ensembl[s] for s in sorted(wanted) if s in ensembl}
        self.context = DataContext(
            dataset=self.name,
            task=self.task,
            vocab=vocab,
            train_pairs=train.loc[:, ["pert", "gene", "pert_idx", "gene_idx", "de", "dir"]].copy(),
            train_perts=tuple(sorted(train["pert"].unique())),
            val_perts=tuple(val_perts),
            test_perts=tuple(sorted(pairs.loc[pairs["stage"] == "test", "pert"].unique())),
            cell_line=self.cell_line,
            clusters={k: v for k, v in mapping.items() if k in vocab},
            source=tables.source,
            ensembl_ids=ensembl_ids,
        )
        for note in self.subset_notes.values():
            log.warning(note)

    def _subset(self, stage: str, frame: pd.DataFrame) -> pd.DataFrame:
        """The CPU-sized subsets: training perturbations, or validation/test genes with all their pairs."""
        rng = np.random.default_rng([self.subset_seed, {"train": 0, "val": 1, "test": 2}[stage]])
        if stage == "train" and self.max_train_perts is not None:
            perts = np.array(sorted(frame["pert"].unique()))
            if self.max_train_perts < len(perts):
                keep = set(rng.choice(perts, size=self.max_train_perts, replace=False).tolist())
                frame = frame.loc[frame["pert"].isin(keep)].reset_index(drop=True)
                self.subset_notes[stage] = (
                    f"data.max_train_perts={self.max_train_perts}: fitting on {len(frame):,} pairs "
                    f"of {len(keep)} of the {len(perts)} training perturbations"
                )
            return frame
        wanted = self.subset_genes.get(stage)
        if wanted is None:
            return frame
        scorable = scorable_genes(frame, self.task)
        if len(scorable) == 0:
            raise DataValidationError(
                f"data.{stage}_genes={wanted}: no {stage} gene of {self.name} has a defined "
                f"per-gene AUROC for task={self.task}"
            )
        chosen = set(rng.choice(scorable, size=min(wanted, len(scorable)), replace=False).tolist())
        subset = frame.loc[frame["gene"].isin(chosen)].reset_index(drop=True)
        self.subset_notes[stage] = (
            f"data.{stage}_genes={wanted}: {stage} split cut to {len(chosen)} seeded genes of "
            f"{frame['gene'].nunique():,} ({len(subset):,} of {len(frame):,} pairs, all pairs of each "
            f"gene), drawn among the {len(scorable)} with a defined per-gene AUROC"
            + (": NOT the official full-test figure" if stage == "test" else "")
        )
        return subset

    def gene_subset(self, stage: str) -> tuple[str, int] | None:
        """``(note, genes)`` when ``stage``'s split was cut to a subset (``data.<stage>_genes``,
        ``data.max_train_perts``): the note a run logs and the number of genes the split holds; None for a
        full split."""
        note = self.subset_notes.get(stage)
        if not note:
            return None
        return note, int(self.frames[stage]["gene"].nunique())

    def split_record(self) -> dict[str, Any]:
        """What is needed to reload this exact split (written as ``split.json`` next to the run)."""
        assert self.context is not None, "call setup() first"
        return {
            "dataset": self.name,
            "task": self.task,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "val_perts": list(self.context.val_perts),
            "train_perts": list(self.context.train_perts),
            "test_perts": list(self.context.test_perts),
        }

    def save_split(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.split_record())

    # ---- loaders ---------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        if stage not in self.splits:
            self.setup()
        rank, world = self._rank_and_world()
        tensors = self.splits[stage].tensors
        grouped = shuffle and self.gene_group_size > 0
        sampler = SplitBatchSampler(
            len(self.splits[stage]),
            self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            equal_shards=shuffle,
            genes=tensors["gene"] if grouped else None,
            labels=tensors["label"] if grouped else None,
            group_size=self.gene_group_size if grouped else 0,
        )
        return DataLoader(self.splits[stage], sampler=sampler, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
