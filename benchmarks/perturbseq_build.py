"""Time ``build_task_files`` on a generated Perturb-seq screen and print cells, genes, seconds and peak memory.

python benchmarks/perturbseq_build.py [--cells-per-pert 100] [--perts 100] [--genes 2000] [--method wilcoxon]

The screen is negative-binomial counts (sparse CSR) with 10 planted DE genes per perturbation; the
printed recall says how many of them the build called, as a sanity check next to the timing.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import pandas as pd


def make_screen(n_genes: int, n_perts: int, cells_per_pert: int, control_cells: int, seed: int = 0):
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i:05d}" for i in range(n_genes)])
    base = np.exp(rng.normal(0.0, 1.2, size=n_genes))  # mostly low counts, as in real screens
    expressed = np.flatnonzero(base > 1.0)
    labels = ["non-targeting"] * control_cells
    means = [np.repeat(base[None, :], control_cells, axis=0)]
    planted = {}
    for p in range(n_perts):
        mean = base.copy()
        chosen = rng.choice(expressed, size=10, replace=False)
        mean[chosen[:5]] *= 3.0
        mean[chosen[5:]] *= 0.25
        planted[f"P{p:04d}"] = set(genes[chosen])
        means.append(np.repeat(mean[None, :], cells_per_pert, axis=0))
        labels += [f"P{p:04d}"] * cells_per_pert
    mu = np.vstack(means) * rng.uniform(0.7, 1.3, size=(len(labels), 1))
    counts = rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)
    adata = anndata.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=genes),
    )
    return adata, planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perts", type=int, default=100)
    parser.add_argument("--cells-per-pert", type=int, default=100)
    parser.add_argument("--control-cells", type=int, default=2000)
    parser.add_argument("--method", default="wilcoxon", choices=["wilcoxon", "t-test"])
    args = parser.parse_args()

    from perturb_models.data.perturbseq import build_task_files

    adata, planted = make_screen(args.genes, args.perts, args.cells_per_pert, args.control_cells)
    # Warm-up on a slice so numba's one-off compilation is not counted.
    build_task_files(
        adata[: args.control_cells + 3 * args.cells_per_pert].copy(),
        tempfile.mkdtemp(),
        name="warm",
        method=args.method,
        progress=False,
        min_cells=10,
    )
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        report = build_task_files(adata, out, name="bench", method=args.method, progress=False)
        seconds = time.perf_counter() - started
        de = pd.read_csv(report.de_path)
    called = set(map(tuple, de.loc[de["label"] == 1, ["pert", "gene"]].to_numpy()))
    truth = {(p, g) for p, gs in planted.items() for g in gs}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"screen: {adata.n_obs} cells x {adata.n_vars} genes, {args.perts} perturbations, method={args.method}")
    print(f"build: {seconds:.1f} s ({adata.n_obs / seconds:,.0f} cells/s, {args.perts / seconds:.1f} perturbations/s)")
    print(f"peak RSS of the process: {peak_mb:,.0f} MB")
    print(f"planted DE pairs recovered: {len(truth & called)}/{len(truth)}; other DE calls: {len(called - truth)}")


if __name__ == "__main__":
    main()
