"""The project's Hydra configs: where they are, and composed from Python (the one ``compose`` for tests,
benchmarks and helper command lines, so each of them gets exactly the config ``python train.py <overrides>``
would run).

The configs live in the repository's ``conf/``; a wheel installs a copy as the ``perturb_models.conf``
package (``pyproject.toml`` maps it). A source checkout (``python train.py``, an editable install) uses its
``conf/``, so edits there take effect; an installed package uses its copy, which Hydra's command lines find
through the ``pkg://perturb_models.conf`` search path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

import perturb_models  # noqa: F401  (registers the config resolvers)

CONF_PACKAGE = "perturb_models.conf"
_CHECKOUT = Path(__file__).resolve().parents[1]


def running_from_checkout() -> bool:
    """Whether this package is the ``perturb_models/`` of a source checkout (with its ``conf/`` beside it)."""
    return (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "conf" / "train.yaml").is_file()


# The config folder (the checkout's conf/, else the installed copy) and the same for @hydra.main.
CONF_DIR = _CHECKOUT / "conf" if running_from_checkout() else Path(__file__).resolve().parent / "conf"
HYDRA_CONFIG_PATH = str(CONF_DIR) if running_from_checkout() else f"pkg://{CONF_PACKAGE}"


def plain(node: Any) -> Any:
    """A config node as plain Python containers, interpolations resolved; anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


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
