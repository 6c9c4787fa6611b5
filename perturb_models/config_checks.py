"""Checks of a composed config before anything runs: impossible values stop the run, naming option and value.

The model section is checked by option name, so every model (and any new one) gets the same rules:
sizes (``*_dim``, ``dim``, ``*_size``, ``*_heads``, ``k``, ``top_k``) are integers > 0, counts
(``num_*``, ``*_layers``, other ``*_k``) integers >= 0, dropouts in [0, 1), learning rates > 0.
A size of 0 would otherwise train a model with constant predictions (AUROC exactly .5) and exit 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig

from perturb_models.errors import ConfigError
from perturb_models.tasks import GSE_TASK, TASK_NAMES


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, str, Any]]:
    """(dotted path, last key, value) of every leaf; interpolations are resolved."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            try:
                value = node[key]
            except Exception as exc:  # an interpolation that does not resolve
                raise ConfigError(f"{prefix}.{key}: cannot be resolved ({exc})") from exc
            yield from _walk(value, f"{prefix}.{key}")
    elif isinstance(node, ListConfig):
        for index, value in enumerate(node):
            yield from _walk(value, f"{prefix}[{index}]")
    else:
        yield prefix, prefix.rsplit(".", 1)[-1], node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_size(key: str) -> bool:
    return key in ("dim", "heads", "k", "top_k", "batch_size") or key.endswith(("_dim", "_size", "_heads"))


def _is_count(key: str) -> bool:
    # retrieval_k=0 means "no retrieval", num_blocks=0 "no residual block": counts may be 0.
    return key.startswith("num_") or key.endswith(("_layers", "_k"))


def _is_dropout(key: str) -> bool:
    return key == "dropout" or key.endswith("_dropout")


def check_value(path: str, key: str, value: Any) -> None:
    if value is None or isinstance(value, str) and value.startswith("${"):
        return
    if _is_dropout(key):
        if not _is_number(value) or not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"{path}={value}: a dropout rate must be a number in [0, 1)")
    elif key == "lr":
        if not _is_number(value) or not float(value) > 0:
            raise ConfigError(f"{path}={value}: the learning rate must be a number > 0")
    elif _is_size(key):
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{path}={value}: must be an integer >= 1")
    elif _is_count(key):
        if not _is_int(value) or value < 0:
            raise ConfigError(f"{path}={value}: must be an integer >= 0")


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first impossible option of a train (or evaluate) config."""
    seed = cfg.get("seed")
    if seed is not None and not _is_int(seed):
        raise ConfigError(f"seed={seed}: must be an integer")
    data = cfg.get("data")
    if data is not None:
        task = data.get("task")
        known = (*TASK_NAMES, GSE_TASK)
        if task is not None and task not in known:
            raise ConfigError(f"data.task={task}: must be one of {', '.join(known)}")
        val_fraction = data.get("val_fraction")
        if val_fraction is not None and (not _is_number(val_fraction) or not 0.0 < float(val_fraction) < 1.0):
            raise ConfigError(f"data.val_fraction={val_fraction}: must be a number in (0, 1)")
        for key in ("batch_size", "eval_batch_size"):
            check_value(f"data.{key}", "batch_size", data.get(key))
    if cfg.get("model") is not None:
        for path, key, value in _walk(cfg.model, "model"):
            check_value(path, key, value)
    _check_rank_term(cfg)
    trainer = cfg.get("trainer")
    if trainer is not None:
        max_epochs = trainer.get("max_epochs")
        if max_epochs is not None and (not _is_int(max_epochs) or max_epochs < -1 or max_epochs == 0):
            raise ConfigError(f"trainer.max_epochs={max_epochs}: must be an integer >= 1 (or -1 for no limit)")
    metric = cfg.get("optimized_metric")
    if metric is not None and not str(metric).startswith("val/"):
        raise ConfigError(f"optimized_metric={metric}: must be a validation metric (val/...); selecting on test leaks")


def _check_rank_term(cfg: DictConfig) -> None:
    """The within-gene ranking term compares pairs of one gene in a batch: without gene-grouped batches
    it would almost never find two, and train as plain cross-entropy while the config says otherwise."""
    model, data = cfg.get("model"), cfg.get("data")
    weight = model.get("rank_weight") if model is not None else None
    if weight is None:
        return
    if not _is_number(weight) or float(weight) < 0:
        raise ConfigError(f"model.rank_weight={weight}: must be a number >= 0")
    group = data.get("gene_group_size", 0) if data is not None else 0
    if not _is_int(group) or group < 0 or group == 1:
        raise ConfigError(f"data.gene_group_size={group}: must be 0 (off) or an integer >= 2")
    if float(weight) > 0 and group < 2:
        raise ConfigError(
            f"model.rank_weight={weight} needs batches with several pairs of one gene: "
            "add data.gene_group_size=N (N >= 2, e.g. 4)"
        )
