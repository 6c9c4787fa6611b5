"""Train one model on one PerturbQA dataset: ``perturb-train model=mlp data=k562`` or ``python train.py ...``
(``--help`` for more)."""

import hydra
from omegaconf import DictConfig

import perturb_models  # noqa: F401  (registers the config resolvers)
from perturb_models.config import HYDRA_CONFIG_PATH
from perturb_models.console import quiet_known_noise, route_library_logs
from perturb_models.errors import cli_errors
from perturb_models.training import train

quiet_known_noise()


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    route_library_logs()
    with cli_errors(run_folder_of=lambda: cfg.paths.output_dir):
        metrics = train(cfg)
    # The value a Hydra sweeper (Optuna) optimises.
    return metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None
