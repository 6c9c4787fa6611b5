"""Adapter-only checkpoints, and the record of the base weights an adapter was trained on.

A LoRA model's frozen base weights are left out of ``state_dict`` and come back from ``pretrained`` (or
the seeded random init of a tiny config) when a checkpoint is loaded. The checkpoint records which base
(id or path, sha256) it was trained on, so that loading it into another base is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from perturb_models.io import atomic_write_bytes, cache_dir, sha256_file
from perturb_models.models.llm.weights import weights_source

RANDOM_BASE_SAMPLE = 4096
"""Values per tensor hashed to fingerprint a random base."""


def keep_adapter_only(module: nn.Module) -> None:
    """From now on ``module``'s checkpoints hold its trainable weights only: every parameter frozen at this
    point is dropped from ``state_dict`` and allowed to be missing when a state dict is loaded strictly."""
    module._frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    module.register_state_dict_post_hook(drop_frozen_weights)
    module.register_load_state_dict_post_hook(allow_missing_frozen_weights)


def drop_frozen_weights(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict hook of :func:`keep_adapter_only`: the frozen base weights are rebuilt on load."""
    for name in module._frozen:
        state_dict.pop(prefix + name, None)


def allow_missing_frozen_weights(module: nn.Module, incompatible_keys) -> None:
    """Load hook of :func:`keep_adapter_only`: strict loading expects the base weights to be missing."""
    missing = incompatible_keys.missing_keys
    for key in list(missing):
        parts = key.split(".")
        if any(".".join(parts[i:]) in module._frozen for i in range(len(parts))):
            missing.remove(key)


def weights_file_sha256(path: Path) -> str:
    """sha256 of a weights file, cached in the user cache by path, size and mtime (an 8B model is 16 GB)."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    memo = cache_dir("weight_hashes", f"{key}.txt")
    if memo.is_file():
        return memo.read_text().strip()
    digest = sha256_file(path)
    atomic_write_bytes(memo, digest.encode())
    return digest


def base_weights_record(pretrained: str | None, llama_config: Mapping[str, Any] | None, init_seed: int, base) -> dict:
    """What the frozen base was: ``pretrained`` and where it was read from, with a sha256 of its weight
    files; for a random base, its config and seed with a sha256 of (a fixed sample of) the weights."""
    if llama_config is not None or pretrained is None:
        # Up to RANDOM_BASE_SAMPLE evenly spaced values of each tensor, copied exactly from where the weights
        # live: another seed or config changes them, and an 8B base is fingerprinted without 32 GB of copies.
        digest = hashlib.sha256()
        for name, tensor in sorted(base.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // RANDOM_BASE_SAMPLE)
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(flat[::step][:RANDOM_BASE_SAMPLE].float().cpu().numpy().tobytes())
        return {
            "pretrained": None,
            "llama_config": dict(llama_config or {}),
            "init_seed": int(init_seed),
            "sha256": digest.hexdigest(),
        }
    location, kwargs = weights_source(pretrained)
    folder = Path(location)
    if "gguf_file" in kwargs:
        files = [folder / kwargs["gguf_file"]]
    elif folder.is_dir():
        files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    else:  # a hub id: the files of the cached snapshot transformers read
        name_or_path = getattr(base.config, "_name_or_path", "")
        snapshot = Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None
        files = sorted(snapshot.glob("*.safetensors")) if snapshot else []
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(weights_file_sha256(path).encode())
    return {
        "pretrained": pretrained,
        "location": str(folder),
        "files": [p.name for p in files],
        "sha256": digest.hexdigest() if files else None,
    }


def check_same_base(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse an adapter whose recorded base (``saved``) has another sha256 than the base loaded now."""
    if saved.get("sha256") and current.get("sha256") and saved["sha256"] != current["sha256"]:
        raise ValueError(
            f"this adapter was trained on base weights {saved.get('pretrained') or 'random'} "
            f"(sha256 {saved['sha256'][:12]}), but the base loaded now is "
            f"{current.get('pretrained') or 'random'} (sha256 {current['sha256'][:12]})"
        )
