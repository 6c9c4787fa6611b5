"""The Hydra configs. Installed, this folder is the package ``perturb_models.conf`` (pyproject.toml maps it), which
the command lines find through Hydra's ``pkg://perturb_models.conf`` search path, and Hydra needs a package to have
this file (perturb_models/config.py)."""
