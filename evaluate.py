"""Evaluate a checkpoint or compare runs.

``python evaluate.py ckpt_path=outputs/.../checkpoints/best.ckpt``
``python evaluate.py runs='[RUN_DIR1,RUN_DIR2]'``

The command is ``perturb_models/cli/evaluate.py`` (installed as ``perturb-evaluate``); this file runs it from
a checkout.
"""

from perturb_models.cli.evaluate import main

if __name__ == "__main__":
    main()
