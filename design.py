"""Propose the next knockdowns to measure, from a trained model and a pool of candidates (``--help`` for more).

``python design.py ckpt_path=RUN_DIR perts=all_known strategy=coverage size=96``

The command is ``perturb_models/cli/design.py`` (installed as ``perturb-design``); this file runs it from
a checkout.
"""

from perturb_models.cli.design import main

if __name__ == "__main__":
    main()
