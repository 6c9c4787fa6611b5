"""Train one model on one PerturbQA dataset: ``python train.py model=mlp data=k562``."""

import hydra
from omegaconf import DictConfig

import perturb_models  # noqa: F401  (registers the config resolvers)
from perturb_models.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # The value a Hydra sweeper (Optuna) optimises.
    return metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
