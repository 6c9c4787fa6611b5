"""Resume: a run stopped after some epochs continues from checkpoints/last.ckpt to the same result,
dropout included; a checkpoint of a different run is refused, naming what differs."""

import pandas as pd
import pytest
import torch

from perturb_models.errors import CheckpointError
from perturb_models.runs import RNG_KEY, AtomicCheckpointIO
from perturb_models.training import train

# The default mlp config (dropout 0.1); early stopping far away so both runs train every epoch.
NO_EARLY_STOP = ["callbacks.early_stopping.patience=100"]


def last_state(run):
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_stopped_run_with_dropout_resumes_to_bit_identical_weights_metrics_and_predictions(synthetic_cfg, tmp_path):
    assert synthetic_cfg().model.encoder.dropout > 0
    straight = tmp_path / "straight"
    expected = train(synthetic_cfg("trainer.max_epochs=3", *NO_EARLY_STOP, output_dir=straight))

    # The interrupted run: its last.ckpt is the end-of-epoch-1 state a kill -9 in epoch 2 leaves behind.
    resumed = tmp_path / "resumed"
    train(synthetic_cfg("trainer.max_epochs=1", *NO_EARLY_STOP, output_dir=resumed))
    steps_per_epoch = last_state(resumed)["global_step"]
    assert last_state(resumed)["epoch"] == 0 and RNG_KEY in last_state(resumed)
    metrics = train(synthetic_cfg("trainer.max_epochs=3", "ckpt_path=last", *NO_EARLY_STOP, output_dir=resumed))

    a, b = last_state(straight), last_state(resumed)
    assert b["global_step"] == a["global_step"] == 3 * steps_per_epoch
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert metrics == expected
    for stage in ("val", "test"):
        pd.testing.assert_frame_equal(
            pd.read_csv(straight / "predictions" / f"{stage}.csv"),
            pd.read_csv(resumed / "predictions" / f"{stage}.csv"),
            check_exact=True,
        )


@pytest.fixture
def one_epoch_run(synthetic_cfg, tmp_path):
    run = tmp_path / "first"
    train(synthetic_cfg("trainer.max_epochs=1", output_dir=run))
    return run


@pytest.mark.parametrize(
    "override, named",
    [
        ("seed=1", r"seed: 0 -> 1.*validation perturbations: \d+ differ"),
        ("model.encoder.hidden_dim=64", r"model\.encoder\.hidden_dim: 256 -> 64"),
        ("data.task=de", r"data\.task: joint -> de"),
        ("data.synthetic.n_perts=150", r"data\.synthetic\.n_perts: 160 -> 150"),
    ],
)
def test_resume_of_a_different_run_is_refused_naming_what_differs(synthetic_cfg, one_epoch_run, override, named):
    before = (one_epoch_run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(
        CheckpointError, match=rf"last\.ckpt belongs to a different run: .*{named}.*resume_mismatch_ok=true"
    ):
        train(synthetic_cfg("trainer.max_epochs=2", "ckpt_path=last", override, output_dir=one_epoch_run))
    assert (one_epoch_run / "checkpoints" / "last.ckpt").read_bytes() == before


def test_resume_mismatch_ok_resumes_anyway(synthetic_cfg, one_epoch_run, caplog):
    train(
        synthetic_cfg(
            "trainer.max_epochs=2",
            "ckpt_path=last",
            "model.encoder.dropout=0.2",
            "resume_mismatch_ok=true",
            output_dir=one_epoch_run,
        )
    )
    assert last_state(one_epoch_run)["epoch"] == 1
    assert "model.encoder.dropout: 0.1 -> 0.2" in caplog.text


def test_resume_without_a_checkpoint_says_how_to_point_at_the_run(synthetic_cfg, tmp_path):
    with pytest.raises(CheckpointError, match=r"ckpt_path=last, but there is no .*hydra.run.dir=<that run folder>"):
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


def test_a_checkpoint_older_than_an_option_resumes_under_its_old_behaviour_only():
    from perturb_models.runs import OPTIONS_ADDED_LATER, resume_differences

    old = {"config": {"seed": 0, "data": {"task": "joint"}, "model": {"name": "mlp"}}}
    defaults = {"data": {"task": "joint", "gene_group_size": 0}, "model": {"name": "mlp", "rank_weight": 0.0}}
    assert set(OPTIONS_ADDED_LATER) == {"data.gene_group_size", "model.rank_weight"}
    assert resume_differences(old, {"config": {"seed": 0, **defaults}}) == []
    ranked = {"data": {"task": "joint", "gene_group_size": 8}, "model": {"name": "mlp", "rank_weight": 1.0}}
    assert resume_differences(old, {"config": {"seed": 0, **ranked}}) == [
        "data.gene_group_size: 0 -> 8",
        "model.rank_weight: 0.0 -> 1.0",
    ]
