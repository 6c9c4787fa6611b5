"""``python -m perturb_models.cli.prompts``: print the LLM prompts of (perturbation, gene) pairs as
``model=lora_llama`` builds them (``perturb_models/models/llm/prompts.py``), and how many test pairs carry
retrieved neighbours.

    python -m perturb_models.cli.prompts data=k562 data.task=joint --first-test 1 --pair ABCE1 APOE
    python -m perturb_models.cli.prompts data=k562 data.task=joint --coverage
"""

from __future__ import annotations

import argparse

from perturb_models.models.llm.prompts import builder_from_context


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the LLM prompts of (perturbation, gene) pairs as model=lora_llama builds them."
    )
    parser.add_argument(
        "--pair", nargs=2, action="append", metavar=("PERT", "GENE"), default=[], help="a pair to print (repeatable)"
    )
    parser.add_argument(
        "--first-test", type=int, default=0, help="also print the first N test pairs that have evidence"
    )
    parser.add_argument(
        "--coverage",
        action="store_true",
        help="also print the share of test pairs whose prompt carries retrieved neighbours",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of train.py, e.g. data=k562 data.task=joint")
    args = parser.parse_args(argv)

    from perturb_models.builders import build_datamodule
    from perturb_models.config import compose_config

    model = [] if any(o.startswith("model=") for o in args.overrides) else ["model=lora_llama"]
    cfg = compose_config("train", [*model, *args.overrides])
    datamodule = build_datamodule(cfg.data)
    encoder_cfg = cfg.model.encoder
    prompt = dict(encoder_cfg.get("prompt") or {})
    builder = builder_from_context(datamodule.context, graphs=encoder_cfg.get("graphs"), **prompt)
    pairs = [tuple(p) for p in args.pair]
    if args.first_test:
        test = datamodule.frames["test"]
        for pert, gene in zip(test["pert"], test["gene"]):
            if len(pairs) >= len(args.pair) + args.first_test:
                break
            if builder.retrieved(pert, gene):
                pairs.append((pert, gene))
    if args.coverage:
        test = datamodule.frames["test"]
        found = [len(builder.retrieved(p, g)) for p, g in zip(test["pert"], test["gene"])]
        with_evidence = sum(1 for n in found if n)
        print(
            f"test pairs with retrieved neighbours: {with_evidence:,} of {len(found):,} "
            f"({with_evidence / len(found):.1%}); "
            f"{sum(found) / len(found):.1f} neighbours per pair on average (retrieval_k={builder.retrieval_k})\n"
        )
    for pert, gene in pairs:
        stage = next(
            (s for s, f in datamodule.frames.items() if ((f["pert"] == pert) & (f["gene"] == gene)).any()), None
        )
        print(builder(pert, gene))
        print(f"[({pert}, {gene}) is in the {stage} split]\n" if stage else f"[({pert}, {gene}) is in no split]\n")


if __name__ == "__main__":
    main()
