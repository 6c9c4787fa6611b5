"""Train one model on one PerturbQA dataset: ``python train.py model=mlp data=k562`` (``--help`` for more).

The command is ``perturb_models/cli/train.py`` (installed as ``perturb-train``); this file runs it from
a checkout.
"""

from perturb_models.cli.train import main

if __name__ == "__main__":
    main()
