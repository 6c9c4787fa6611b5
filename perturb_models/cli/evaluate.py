"""Evaluate a checkpoint or compare runs (``--help`` for more).

``perturb-evaluate ckpt_path=outputs/.../checkpoints/best.ckpt`` or ``python evaluate.py ...``
``perturb-evaluate runs='[RUN_DIR1,RUN_DIR2]'``
"""

import hydra
from omegaconf import DictConfig

import perturb_models  # noqa: F401  (registers the config resolvers)
from perturb_models.config import HYDRA_CONFIG_PATH
from perturb_models.console import quiet_known_noise, route_library_logs
from perturb_models.errors import cli_errors
from perturb_models.evaluation import evaluate

quiet_known_noise()


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    route_library_logs()
    with cli_errors():
        evaluate(cfg)
