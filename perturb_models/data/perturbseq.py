"""Bring your own screen: PerturbQA task files from a Perturb-seq AnnData.

``python -m perturb_models.data.perturbseq build INPUT.h5ad OUTDIR --name NAME`` reads a Perturb-seq
AnnData (cells x genes, the perturbation of each cell in an ``obs`` column, control cells under one
label), tests every perturbation against the control cells with scanpy's ``rank_genes_groups``, calls
a gene differentially expressed (DE) when its Benjamini-Hochberg adjusted p-value is below ``pval``
and its |log2 fold change| is at least ``lfc``, and writes ``NAME-de.csv`` / ``NAME-dir.csv`` in the
PerturbQA format. ``python train.py data=custom data.name=NAME data.root=OUTDIR`` then trains on them.

Candidate genes per perturbation are all its DE genes plus ``negatives_ratio`` times as many sampled
non-DE genes (at least ``min_negatives``), as in PerturbQA where most scored pairs are negatives. The
perturbed gene itself (when the label is a gene of the screen) is never a candidate: its knockdown is
the intervention, not a downstream effect. The train/test split is by perturbation and seeded.

scanpy and anndata come with the ``screen`` extra: ``pip install -e ".[screen]"``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from perturb_models.data.perturbqa import TaskTables, task_file_name, validate_tables
from perturb_models.io import atomic_write_dataframe, atomic_write_json

METHODS = ("wilcoxon", "t-test")
DATA_KINDS = ("auto", "counts", "log")
_GROUP_KEY = "_perturbation"  # private obs column of the working copy, so user columns are never touched
_RESULT_KEY = "_perturb_models_de"


class PerturbseqError(ValueError):
    """The AnnData cannot be turned into task files; the message says what was found and what to pass."""


@dataclass
class BuildReport:
    """What ``build_task_files`` did: the files, the counts, and every perturbation it left out and why."""

    name: str
    de_path: str
    dir_path: str
    data_kind: str
    method: str
    params: dict[str, Any]
    n_cells: int
    n_genes: int
    n_control_cells: int
    perturbations_tested: int
    skipped_few_cells: dict[str, int] = field(default_factory=dict)
    no_de_genes: list[str] = field(default_factory=list)
    target_excluded: int = 0
    de_pairs: int = 0
    up_pairs: int = 0
    down_pairs: int = 0
    pairs: int = 0
    train_perts: int = 0
    test_perts: int = 0

    def summary(self) -> str:
        lines = [
            f"{self.n_cells} cells x {self.n_genes} genes ({self.data_kind}); {self.n_control_cells} control cells",
            f"{self.perturbations_tested} perturbations tested ({self.method}); "
            f"{len(self.skipped_few_cells)} skipped for fewer than {self.params['min_cells']} cells",
            f"{self.pairs} candidate pairs, {self.de_pairs} DE ({self.up_pairs} up, {self.down_pairs} down); "
            f"{self.train_perts} train / {self.test_perts} test perturbations",
        ]
        if self.skipped_few_cells:
            shown = ", ".join(f"{p} ({n})" for p, n in list(self.skipped_few_cells.items())[:10])
            more = "" if len(self.skipped_few_cells) <= 10 else f", ... ({len(self.skipped_few_cells)} in all)"
            lines.append(f"skipped (cells): {shown}{more}")
        if self.no_de_genes:
            lines.append(f"{len(self.no_de_genes)} perturbation(s) with no DE gene (kept, negatives only)")
        lines.append(f"wrote {self.de_path}")
        lines.append(f"wrote {self.dir_path}")
        return "\n".join(lines)


def _require_scanpy():
    try:
        import anndata  # noqa: F401
        import scanpy
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'building task files from an AnnData needs scanpy and anndata: pip install -e ".[screen]" '
            "(or pip install scanpy anndata)"
        ) from exc
    return scanpy


def read_anndata(path: str | os.PathLike):
    """Read an ``.h5ad`` file, with an error that names the path when it is missing or unreadable."""
    _require_scanpy()
    import anndata

    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such AnnData file (expected an .h5ad written by anndata/scanpy)")
    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # h5py and anndata raise many types for a bad file
        raise PerturbseqError(f"{path}: could not be read as an AnnData .h5ad file ({exc})") from exc


def _sample_values(matrix, max_values: int = 200_000, seed: int = 0) -> np.ndarray:
    """A sample of the stored (non-zero for sparse) values of a matrix, for cheap format checks."""
    import scipy.sparse as sp

    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()
    values = np.asarray(values)
    if values.size > max_values:
        values = np.random.default_rng(seed).choice(values, size=max_values, replace=False)
    return values.astype(np.float64, copy=False)


def detect_data_kind(matrix) -> str:
    """``counts`` (non-negative integers), ``normalised`` (non-negative, not integers, large values:
    not yet log-transformed) or ``log`` (non-negative, small). Negative values (scaled data) are refused:
    fold changes need expression on a count or log scale."""
    values = _sample_values(matrix)
    if values.size == 0:
        raise PerturbseqError("the expression matrix is empty (no non-zero values)")
    if not np.isfinite(values).all():
        raise PerturbseqError("the expression matrix holds NaN or infinite values")
    if (values < 0).any():
        raise PerturbseqError(
            "the expression matrix has negative values, as after sc.pp.scale or regression; give raw counts "
            "or log-normalised values (e.g. a 'counts' layer: --layer counts)"
        )
    if np.all(values == np.round(values)):
        return "counts"
    # log1p of 1e4-normalised counts stays below ~12; larger values mean normalised but not logged.
    return "normalised" if values.max() > 30 else "log"


def _log_normalise(adata, kind: str):
    import scanpy as sc

    if kind == "counts":
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    elif kind == "normalised":
        sc.pp.log1p(adata)
    return adata


def _working_copy(adata, obs_key: str, control: str, layer: str | None, gene_key: str | None, source: str):
    """A bare AnnData (expression, one label column, gene symbols) so the user's object is never modified."""
    import anndata

    if obs_key not in adata.obs.columns:
        raise PerturbseqError(
            f"{source}: obs has no column {obs_key!r}; pass the perturbation column with --obs-key. "
            f"obs columns: {', '.join(map(str, adata.obs.columns)) or '(none)'}"
        )
    labels = adata.obs[obs_key]
    if labels.isna().any():
        raise PerturbseqError(
            f"{source}: obs[{obs_key!r}] is empty for {int(labels.isna().sum())} cell(s) "
            f"(e.g. cell {adata.obs_names[int(np.flatnonzero(labels.isna().to_numpy())[0])]!r}); "
            "label every cell or drop the unlabelled ones"
        )
    labels = labels.astype(str).str.strip()
    if not (labels == control).any():
        common = labels.value_counts().head(8)
        shown = ", ".join(f"{k!r} ({v})" for k, v in common.items())
        raise PerturbseqError(
            f"{source}: no control cells: no cell has {obs_key}={control!r}. Pass the control label with "
            f"--control; the most common labels are {shown}"
        )
    if layer:
        if layer not in adata.layers:
            raise PerturbseqError(f"{source}: no layer {layer!r}; layers: {', '.join(adata.layers.keys()) or '(none)'}")
        matrix = adata.layers[layer]
    else:
        matrix = adata.X
    if gene_key:
        if gene_key not in adata.var.columns:
            raise PerturbseqError(
                f"{source}: var has no column {gene_key!r}; var columns: "
                f"{', '.join(map(str, adata.var.columns)) or '(none)'}"
            )
        genes = adata.var[gene_key].astype(str).str.strip()
    else:
        genes = pd.Series(adata.var_names.astype(str), index=adata.var_names).str.strip()
    duplicated = genes[genes.duplicated()].unique()
    if len(duplicated):
        raise PerturbseqError(
            f"{source}: {len(duplicated)} gene name(s) occur more than once (e.g. {duplicated[0]!r}); each gene "
            "must be one column. Sum or drop the duplicates, or use another var column with --gene-key"
        )
    if (genes == "").any():
        raise PerturbseqError(f"{source}: a gene has an empty name (var column {gene_key or 'var_names'})")
    obs = pd.DataFrame({_GROUP_KEY: pd.Categorical(labels.to_numpy())}, index=adata.obs_names.astype(str))
    work = anndata.AnnData(X=matrix.copy(), obs=obs, var=pd.DataFrame(index=pd.Index(genes.to_numpy(), name=None)))
    return work


def _de_tables_for(work, perts: Sequence[str], control: str, method: str) -> dict[str, pd.DataFrame]:
    """rank_genes_groups of each perturbation in ``perts`` against the control cells."""
    import scanpy as sc

    # Tie correction matters for Wilcoxon on sparse counts, where most values are tied zeros.
    extra = {"tie_correct": True} if method == "wilcoxon" else {}
    sc.tl.rank_genes_groups(
        work,
        groupby=_GROUP_KEY,
        groups=list(perts),
        reference=control,
        method=method,
        n_genes=work.n_vars,
        corr_method="benjamini-hochberg",
        key_added=_RESULT_KEY,
        **extra,
    )
    result = work.uns[_RESULT_KEY]
    tables = {}
    for pert in perts:
        tables[pert] = pd.DataFrame(
            {
                "gene": np.asarray(result["names"][pert]).astype(str),
                "lfc": np.asarray(result["logfoldchanges"][pert], dtype=np.float64),
                "pval_adj": np.asarray(result["pvals_adj"][pert], dtype=np.float64),
            }
        )
    del work.uns[_RESULT_KEY]
    return tables


def call_de(table: pd.DataFrame, pval: float, lfc: float) -> pd.DataFrame:
    """Add ``de`` (adjusted p < pval and |log2 FC| >= lfc) and ``up`` (log2 FC > 0) to one test table.

    Genes without a finite statistic (e.g. zero in every cell compared) are never DE.
    """
    finite = np.isfinite(table["lfc"]) & np.isfinite(table["pval_adj"])
    de = finite & (table["pval_adj"] < pval) & (table["lfc"].abs() >= lfc)
    return table.assign(de=de.astype(np.int64), up=(table["lfc"] > 0).astype(np.int64), finite=finite)


def split_perturbations(perts: Sequence[str], test_fraction: float, seed: int) -> dict[str, str]:
    """A seeded perturbation -> 'train'|'test' map; every perturbation lands in exactly one split."""
    if not 0.0 < test_fraction < 1.0:
        raise PerturbseqError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perts = sorted(perts)
    n_test = max(1, int(round(test_fraction * len(perts))))
    # Training also carves a validation slice from train, so it needs at least two perturbations.
    if len(perts) - n_test < 2:
        raise PerturbseqError(
            f"only {len(perts)} perturbation(s) with enough cells: a train split (>= 2, validation is carved "
            f"from it) and a test split (>= 1) need at least 3. Lower --min-cells or --test-fraction"
        )
    rng = np.random.default_rng(seed)
    test = set(rng.choice(perts, size=n_test, replace=False).tolist())
    return {p: ("test" if p in test else "train") for p in perts}


def build_task_files(
    adata,
    outdir: str | os.PathLike,
    name: str | None = None,
    obs_key: str = "perturbation",
    control: str = "non-targeting",
    method: str = "wilcoxon",
    pval: float = 0.05,
    lfc: float = 0.5,
    negatives_ratio: float = 1.0,
    min_negatives: int = 10,
    min_cells: int = 20,
    test_fraction: float = 0.2,
    seed: int = 0,
    data_kind: str = "auto",
    layer: str | None = None,
    gene_key: str | None = None,
    chunk_size: int = 16,
    progress: bool = True,
) -> BuildReport:
    """Test each perturbation against control cells and write ``NAME-de.csv`` and ``NAME-dir.csv``.

    ``adata`` is an AnnData or the path of an ``.h5ad`` file (``name`` defaults to its stem). Returns a
    :class:`BuildReport`; the same record is written to ``NAME-build.json`` beside the task files.
    Perturbations with fewer than ``min_cells`` cells are skipped and listed in the report.
    """
    _require_scanpy()
    source = "<AnnData>"
    if isinstance(adata, (str, os.PathLike)):
        source = str(adata)
        name = name or Path(adata).name.split(".")[0]
        adata = read_anndata(adata)
    if not name:
        raise PerturbseqError("a dataset name is needed (--name NAME) when the AnnData is not read from a file")
    if any(ch in name for ch in "/\\") or name.startswith("."):
        raise PerturbseqError(f"dataset name {name!r} must be a plain file-name prefix (no slashes)")
    if method not in METHODS:
        raise PerturbseqError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if data_kind not in DATA_KINDS:
        raise PerturbseqError(f"data_kind must be one of {', '.join(DATA_KINDS)}, got {data_kind!r}")
    if not 0.0 < pval <= 1.0:
        raise PerturbseqError(f"pval must be in (0, 1], got {pval}")
    if lfc < 0 or negatives_ratio < 0 or min_negatives < 0:
        raise PerturbseqError("lfc, negatives_ratio and min_negatives must be >= 0")
    if min_cells < 2:
        raise PerturbseqError(f"min_cells must be >= 2 (a test needs cells to compare), got {min_cells}")

    work = _working_copy(adata, obs_key, control, layer, gene_key, source)
    detected = detect_data_kind(work.X)
    if data_kind == "counts" and detected != "counts":
        raise PerturbseqError("data_kind=counts, but the matrix holds non-integer values; use --data-kind auto or log")
    kind = detected if data_kind == "auto" else data_kind
    _log_normalise(work, kind)

    cell_counts = work.obs[_GROUP_KEY].value_counts()
    n_control = int(cell_counts[control])
    if n_control < min_cells:
        raise PerturbseqError(
            f"{source}: only {n_control} control cell(s) ({obs_key}={control!r}); at least min_cells={min_cells} are "
            f"needed"
        )
    candidates = cell_counts.drop(index=control)
    skipped = {str(p): int(n) for p, n in candidates.items() if n < min_cells}
    perts = sorted(str(p) for p, n in candidates.items() if n >= min_cells)
    if not perts:
        raise PerturbseqError(
            f"{source}: no perturbation has at least min_cells={min_cells} cells "
            f"({len(candidates)} perturbation label(s), at most {int(candidates.max()) if len(candidates) else 0} "
            f"cells)"
        )

    genes = work.var_names.to_numpy().astype(str)
    gene_set = set(genes)
    position = {pert: i for i, pert in enumerate(perts)}
    rows: list[pd.DataFrame] = []
    no_de: list[str] = []
    target_excluded = 0
    with tqdm(total=len(perts), desc=f"DE tests ({method})", unit="pert", disable=not progress) as bar:
        for start in range(0, len(perts), chunk_size):
            chunk = perts[start : start + chunk_size]
            for pert, table in _de_tables_for(work, chunk, control, method).items():
                table = call_de(table, pval, lfc)
                if pert in gene_set:
                    target_excluded += 1
                    table = table.loc[table["gene"] != pert]
                positives = table.loc[table["de"] == 1]
                if positives.empty:
                    no_de.append(pert)
                pool = table.loc[(table["de"] == 0) & table["finite"], "gene"].to_numpy()
                n_neg = min(len(pool), max(int(min_negatives), int(math.ceil(negatives_ratio * len(positives)))))
                # One generator per perturbation (seed, position): the sample of one perturbation does
                # not change when another one is added or skipped.
                rng = np.random.default_rng([int(seed), position[pert]])
                negatives = rng.choice(pool, size=n_neg, replace=False) if n_neg else np.array([], dtype=str)
                rows.append(
                    pd.DataFrame(
                        {
                            "pert": pert,
                            "gene": np.concatenate([positives["gene"].to_numpy(), negatives]).astype(str),
                            "de": np.concatenate([np.ones(len(positives), np.int64), np.zeros(n_neg, np.int64)]),
                            "up": np.concatenate([positives["up"].to_numpy(), np.zeros(n_neg, np.int64)]),
                        }
                    )
                )
            bar.update(len(chunk))

    pairs = pd.concat(rows, ignore_index=True)
    kept = sorted(pairs["pert"].unique())
    split = split_perturbations(kept, test_fraction, seed)
    pairs["split"] = pairs["pert"].map(split)
    # Train rows first, then test, as in the PerturbQA files.
    pairs = pairs.sort_values(
        ["split", "pert", "gene"],
        key=lambda c: c.map({"train": 0, "test": 1}) if c.name == "split" else c,
        kind="stable",
    ).reset_index(drop=True)
    for split_name in ("train", "test"):
        if not ((pairs["split"] == split_name) & (pairs["de"] == 1)).any():
            raise PerturbseqError(
                f"the {split_name} split has no DE pair, so {name}-dir.csv would have no {split_name} rows. "
                f"{pairs['de'].sum()} DE pairs in all: loosen --pval/--lfc, or change --seed/--test-fraction"
            )
    de_table = pairs.loc[:, ["pert", "gene", "de", "split"]].rename(columns={"de": "label"})
    dir_table = pairs.loc[pairs["de"] == 1, ["pert", "gene", "up", "split"]].rename(columns={"up": "label"})
    outdir = Path(os.path.expanduser(str(outdir)))
    # Same checks as when the files are read for training, before anything lands on disk.
    tables: TaskTables = validate_tables(name, de_table, dir_table, source=str(outdir))
    de_path = atomic_write_dataframe(outdir / task_file_name(name, "de"), tables.de)
    dir_path = atomic_write_dataframe(outdir / task_file_name(name, "dir"), tables.dir)

    report = BuildReport(
        name=name,
        de_path=str(de_path),
        dir_path=str(dir_path),
        data_kind=kind,
        method=method,
        params=dict(
            obs_key=obs_key,
            control=control,
            pval=pval,
            lfc=lfc,
            negatives_ratio=negatives_ratio,
            min_negatives=min_negatives,
            min_cells=min_cells,
            test_fraction=test_fraction,
            seed=seed,
            layer=layer,
            gene_key=gene_key,
            source=source,
        ),
        n_cells=int(work.n_obs),
        n_genes=int(work.n_vars),
        n_control_cells=n_control,
        perturbations_tested=len(perts),
        skipped_few_cells=skipped,
        no_de_genes=sorted(no_de),
        target_excluded=target_excluded,
        de_pairs=int(pairs["de"].sum()),
        up_pairs=int(dir_table["label"].sum()),
        down_pairs=int((dir_table["label"] == 0).sum()),
        pairs=len(pairs),
        train_perts=sum(v == "train" for v in split.values()),
        test_perts=sum(v == "test" for v in split.values()),
    )
    atomic_write_json(outdir / f"{name}-build.json", asdict(report))
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m perturb_models.data.perturbseq",
        description="Turn a Perturb-seq screen (AnnData .h5ad) into PerturbQA task files NAME-de.csv and NAME-dir.csv.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="test each perturbation against control cells and write NAME-de.csv / NAME-dir.csv",
        description=(
            "Test every perturbation against the control cells (scanpy rank_genes_groups), call DE genes by "
            "adjusted p-value and |log2 fold change|, pick candidate genes (all DE genes + sampled non-DE genes), "
            "split perturbations into train/test, and write OUTDIR/NAME-de.csv, NAME-dir.csv and NAME-build.json. "
            "Train on them with: python train.py data=custom data.name=NAME data.root=OUTDIR"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    build.add_argument("input", help="the screen: an .h5ad file (cells x genes; raw counts or log-normalised)")
    build.add_argument("outdir", help="folder for the task files (created if missing)")
    build.add_argument("--name", default=None, help="dataset name, the files' prefix (default: the input file's stem)")
    build.add_argument("--obs-key", default="perturbation", help="obs column with each cell's perturbation label")
    build.add_argument("--control", default="non-targeting", help="the obs label of control cells")
    build.add_argument("--method", choices=METHODS, default="wilcoxon", help="scanpy rank_genes_groups test")
    build.add_argument(
        "--pval", type=float, default=0.05, help="DE when the Benjamini-Hochberg adjusted p-value is below this"
    )
    build.add_argument("--lfc", type=float, default=0.5, help="... and |log2 fold change| is at least this")
    build.add_argument(
        "--negatives-ratio",
        type=float,
        default=1.0,
        help="sampled non-DE candidate genes per DE gene, per perturbation",
    )
    build.add_argument(
        "--min-negatives",
        type=int,
        default=10,
        help="at least this many non-DE candidates per perturbation (so ones without DE genes still count)",
    )
    build.add_argument(
        "--min-cells",
        type=int,
        default=20,
        help="perturbations with fewer cells are skipped (and listed); control needs as many",
    )
    build.add_argument("--test-fraction", type=float, default=0.2, help="share of perturbations in the test split")
    build.add_argument("--seed", type=int, default=0, help="seed of the negative sampling and the split")
    build.add_argument(
        "--data-kind",
        choices=DATA_KINDS,
        default="auto",
        help="auto: integer values are counts (normalize_total + log1p), large non-integers get log1p, "
        "small non-negative values are used as log-normalised",
    )
    build.add_argument("--layer", default=None, help="use this layer instead of X (e.g. counts)")
    build.add_argument(
        "--gene-key",
        default=None,
        help="var column with gene symbols (default: var_names), e.g. gene_symbols when var_names are Ensembl ids",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = build_task_files(
            args.input,
            args.outdir,
            name=args.name,
            obs_key=args.obs_key,
            control=args.control,
            method=args.method,
            pval=args.pval,
            lfc=args.lfc,
            negatives_ratio=args.negatives_ratio,
            min_negatives=args.min_negatives,
            min_cells=args.min_cells,
            test_fraction=args.test_fraction,
            seed=args.seed,
            data_kind=args.data_kind,
            layer=args.layer,
            gene_key=args.gene_key,
            progress=not args.no_progress,
        )
    except (PerturbseqError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"Train on it: python train.py data=custom data.name={report.name} data.root={args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
