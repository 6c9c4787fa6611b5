"""The package works outside its checkout: the wheel, installed into a fresh virtual environment, carries
every module and config, and its console script trains a model from an unrelated folder, writing there.

No download: the wheel is built with this environment's setuptools (--no-build-isolation) and installed
with --no-deps; the new environment sees this one's dependencies through a .pth file (added after the
install, so pip does not see this environment's perturb_models), which adds a folder to sys.path without
running that folder's own .pth files, so the editable install of this checkout stays invisible there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from tests.conftest import REPO

# What the wheel is built from (pyproject.toml: the package, the conf/ it maps into it, the readme).
SOURCES = ["pyproject.toml", "README.md", "perturb_models", "conf"]


def run(args: list, cwd: Path, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_the_wheel_installed_in_a_fresh_venv_trains_from_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    env["PERTURB_MODELS_CACHE"] = str(tmp_path / "cache")

    # The wheel, built from a copy of what it needs (nothing written into the checkout).
    source, dist = tmp_path / "source", tmp_path / "dist"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, "."], source, env)
    (wheel,) = dist.glob("perturb_models-*.whl")

    # A fresh environment with the wheel (not editable), then this environment's packages behind it.
    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        tmp_path,
        env,
    )
    site = Path(
        run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip()
    )
    (site / "outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # Every module and config of the checkout is installed, byte for byte (a package missing from
    # pyproject.toml's list, or a config left out of the package data, fails here).
    installed = site / "perturb_models"
    expected = {p.relative_to(REPO / "perturb_models") for p in (REPO / "perturb_models").rglob("*.py")}
    expected |= {
        Path("conf") / p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*") if p.suffix in (".yaml", ".py")
    }
    missing = sorted(str(p) for p in expected if not (installed / p).is_file())
    assert not missing, f"not in the wheel: {missing}"

    def checkout_file(path: Path) -> Path:
        return REPO / path if path.parts[0] == "conf" else REPO / "perturb_models" / path

    changed = sorted(str(p) for p in expected if (installed / p).read_bytes() != checkout_file(p).read_bytes())
    assert not changed, changed

    # From a folder outside the checkout: the installed code and configs, outputs under that folder.
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(
        [
            python,
            "-c",
            "import perturb_models.config as c; print(c.__file__); print(c.CONF_DIR); print(c.HYDRA_CONFIG_PATH)",
        ],
        work,
        env,
    ).stdout.split()
    assert where == [str(installed / "config.py"), str(installed / "conf"), "pkg://perturb_models.conf"], where

    script = fresh / "bin" / "perturb-train"
    help_text = run([script, "--help"], work, env).stdout
    assert (
        "perturb_models: train and compare models" in help_text and "model: _base" in help_text and "mlp" in help_text
    )

    run(
        [
            script,
            "data=synthetic",
            "model=mlp",
            "logger=none",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "data.synthetic.n_genes=80",
            "data.synthetic.n_perts=60",
            "data.synthetic.negatives_per_pert=12",
            "data.batch_size=64",
        ],
        work,
        env,
        timeout=300,
    )
    (metrics,) = (work / "outputs" / "train").rglob("metrics.json")
    assert (metrics.parent / "train.log").is_file() and (metrics.parent / "checkpoints" / "best.ckpt").is_file()
    assert (
        not (site / "outputs").exists()
        and not (REPO / "outputs" / "train" / "synthetic-joint-mlp" / metrics.parent.name).exists()
    )
