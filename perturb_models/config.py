"""The project's Hydra configs composed from Python: the one ``compose`` for tests, benchmarks and helper
command lines, so each of them gets exactly the config ``python train.py <overrides>`` would run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import perturb_models  # noqa: F401  (registers the config resolvers)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(
    config_name: str = "train",
    overrides: Sequence[str] | None = None,
    output_dir: str | Path | None = None,
    return_hydra_config: bool = False,
) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, composed as the command line would; the run folder
    (``paths.output_dir``) set to ``output_dir`` when given. Not for use inside a running Hydra app."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=return_hydra_config)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg
