"""Propose the next knockdowns to measure, from a trained model and a pool of candidates (``--help`` for more).

``perturb-design ckpt_path=RUN_DIR perts=all_known strategy=coverage size=96`` or ``python design.py ...``
"""

import hydra
from omegaconf import DictConfig

import perturb_models  # noqa: F401  (registers the config resolvers)
from perturb_models.config import HYDRA_CONFIG_PATH
from perturb_models.console import quiet_known_noise, route_library_logs
from perturb_models.design import design
from perturb_models.errors import cli_errors

quiet_known_noise()


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="design")
def main(cfg: DictConfig) -> None:
    route_library_logs()
    with cli_errors(run_folder_of=lambda: cfg.paths.output_dir):
        design(cfg)
