"""``train(cfg)``: the one entry of a run. The config is checked, the run folder locked for the whole run
(``runs.py``), and the run handed to its kind's runner (``perturb_models/runners``: ``pairs``, ``stacking``,
``gene_sets``), which fits on train, selects on validation, tests the selected checkpoint and publishes the
outputs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from perturb_models.config_checks import validate_config
from perturb_models.runners import runner_for
from perturb_models.runs import lock_run_folder


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit on train, select on validation, test the best checkpoint; return val/ and test/ metrics.

    The config is checked first, and the run folder is locked for the whole run (see ``runs.py``).
    """
    validate_config(cfg)
    runner = runner_for(cfg)
    output_dir = Path(cfg.paths.output_dir)
    with lock_run_folder(output_dir):
        return runner.train(cfg, output_dir)
