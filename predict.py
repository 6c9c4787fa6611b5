"""Ask a trained model which genes change after knockdowns, measured or not (``--help`` for more).

``python predict.py ckpt_path=RUN_DIR perts='[KRAS,MT-CO1]'``
``python predict.py ckpt_path=RUN_DIR perts=all_known genes='[HBG1,GATA1]'``

The command is ``perturb_models/cli/predict.py`` (installed as ``perturb-predict``); this file runs it from
a checkout.
"""

from perturb_models.cli.predict import main

if __name__ == "__main__":
    main()
