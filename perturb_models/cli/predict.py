"""Ask a trained model which genes change after knockdowns, measured or not (``--help`` for more).

``perturb-predict ckpt_path=RUN_DIR perts='[KRAS,MT-CO1]'`` or ``python predict.py ...``
``perturb-predict ckpt_path=RUN_DIR perts=all_known genes='[HBG1,GATA1]'``
"""

import hydra
from omegaconf import DictConfig

import perturb_models  # noqa: F401  (registers the config resolvers)
from perturb_models.config import HYDRA_CONFIG_PATH
from perturb_models.console import quiet_known_noise, route_library_logs
from perturb_models.errors import cli_errors
from perturb_models.prediction import predict

quiet_known_noise()


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    route_library_logs()
    with cli_errors(run_folder_of=lambda: cfg.paths.output_dir):
        predict(cfg)
