"""``python -m perturb_models.knowledge coverage --data k562``: how many dataset genes the knowledge files know."""

from __future__ import annotations

import argparse
import logging
import sys

from perturb_models.knowledge.annotations import resolve_symbols, symbol_go_terms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perturb_models.knowledge")
    sub = parser.add_subparsers(dest="command", required=True)
    cov = sub.add_parser("coverage", help="report dataset genes found / missing in gene_info and gene2go")
    cov.add_argument("--data", required=True, help="dataset name (k562, rpe1, hepg2, jurkat, k562_set, or your own)")
    cov.add_argument(
        "--data-root", default=None, help="folder of the PerturbQA CSVs (default: $PERTURBQA_DATA, else cache)"
    )
    cov.add_argument(
        "--root", default=None, help="folder of the knowledge files (default: $PERTURB_KNOWLEDGE, else cache)"
    )
    cov.add_argument("--no-download", action="store_true", help="fail instead of downloading missing files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # The command line joins the two sides; the knowledge library itself never reads dataset files.
    from perturb_models.data.perturbqa import (
        PERTURBQA_ENSEMBL_MAP,
        dataset_symbols,
        read_ensembl_map,
        resolve_data_root,
    )

    symbols = dataset_symbols(args.data, args.data_root)
    ensembl = read_ensembl_map(resolve_data_root(args.data_root), PERTURBQA_ENSEMBL_MAP, None, not args.no_download)
    report = resolve_symbols(symbols, args.root, not args.no_download, ensembl_ids=ensembl)
    print(report.summary(f"{args.data} genes in gene_info"))
    terms, _ = symbol_go_terms(symbols, args.root, allow_download=not args.no_download, ensembl_ids=ensembl)
    print(
        f"{args.data} genes with GO annotations (gene2go): {len(terms)}/{len(symbols)} "
        f"({len(terms) / max(1, len(symbols)):.1%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
