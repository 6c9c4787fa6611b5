"""Loggers: W&B offline without credentials (and always finished), CSV, none."""

from perturb_models.builders import wandb_mode
from perturb_models.training import train


def test_wandb_runs_offline_without_credentials_and_says_how_to_sync(synthetic_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    assert wandb_mode() == "offline"
    train(synthetic_cfg("logger=wandb", "trainer.max_epochs=1"))
    out = capsys.readouterr().out
    assert "W&B ran offline" in out and "wandb sync" in out
    import wandb

    assert wandb.run is None, "wandb.finish() must close the run"
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert any(p.suffix == ".wandb" for p in offline_runs[0].iterdir())


def test_wandb_is_finished_even_when_training_fails(synthetic_cfg, tmp_path, monkeypatch):
    import pytest
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    from perturb_models.models.classifier import PerturbationClassifier

    def failing_step(self, batch, batch_idx):
        raise RuntimeError("training step failed")

    monkeypatch.setattr(PerturbationClassifier, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="training step failed"):
        train(synthetic_cfg("logger=wandb"))
    assert wandb.run is None


def test_wandb_mode_respects_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"


def test_csv_logger_writes_metrics(synthetic_cfg, tmp_path):
    train(synthetic_cfg("logger=csv", "trainer.max_epochs=1"))
    text = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "val/de_auroc_per_gene" in text and "test/de_auroc_per_gene" in text
    # Test metrics once (test/...); final/ holds only the selected checkpoint's validation metrics.
    assert "final/test/" not in text and "final/val/de_auroc_per_gene" in text
