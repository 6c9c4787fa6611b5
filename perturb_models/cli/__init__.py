"""The command lines, one module per command so that Hydra names each job after it (``train.log``,
``evaluate.log``, ...): ``perturb-train`` / ``python train.py``, ``perturb-evaluate`` / ``python evaluate.py``,
``perturb-predict`` / ``python predict.py``, ``perturb-design`` / ``python design.py``. The scripts at the
repository root only call these; the console scripts are declared in ``pyproject.toml``."""
