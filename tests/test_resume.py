"""Resume: a run stopped after some epochs continues from checkpoints/last.ckpt to the same result."""

import pytest
import torch

from perturb_models.training import AtomicCheckpointIO, train

NO_DROPOUT = ["model.encoder.dropout=0.0", "callbacks.early_stopping.patience=100"]


def last_state(run):
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_stopped_run_resumes_from_last_checkpoint_and_matches_an_uninterrupted_run(synthetic_cfg, tmp_path):
    straight = tmp_path / "straight"
    train(synthetic_cfg("trainer.max_epochs=3", *NO_DROPOUT, output_dir=straight))

    resumed = tmp_path / "resumed"
    train(synthetic_cfg("trainer.max_epochs=1", *NO_DROPOUT, output_dir=resumed))
    steps_per_epoch = last_state(resumed)["global_step"]
    assert last_state(resumed)["epoch"] == 0
    metrics = train(synthetic_cfg("trainer.max_epochs=3", "ckpt_path=last", *NO_DROPOUT, output_dir=resumed))

    a, b = last_state(straight), last_state(resumed)
    assert b["global_step"] == a["global_step"] == 3 * steps_per_epoch
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert metrics["test/de_auroc_per_gene"] > 0


def test_resume_without_a_checkpoint_says_how_to_point_at_the_run(synthetic_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last, but there is no .*hydra.run.dir=<that run folder>"):
        train(synthetic_cfg("ckpt_path=last"))


def test_checkpoint_write_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def torn_save(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
