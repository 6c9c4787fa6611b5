"""Evaluate a checkpoint or compare runs.

``python evaluate.py ckpt_path=outputs/.../checkpoints/best.ckpt``
``python evaluate.py runs='[RUN_DIR1,RUN_DIR2]'``
"""

import hydra
from omegaconf import DictConfig

import perturb_models  # noqa: F401  (registers the config resolvers)
from perturb_models.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
