"""Task semantics (perturb_models/tasks.py): classes, label encoding, score decoding, files, metric names."""

import numpy as np
import pytest
import torch

from perturb_models.tasks import (
    QUESTIONS,
    TASKS,
    decode_logits,
    decode_scores,
    encode_labels,
    get_task,
    headline_metrics,
    primary_metric,
)

# File labels of four pairs: not DE, DE down, DE up, and not DE (direction unknown).
DE = np.array([0, 1, 1, 0])
DIRECTION = np.array([-1, 0, 1, -1])


def test_joint_labels_follow_the_class_order_not_de_down_up():
    labels = encode_labels(DE, DIRECTION, "joint")
    assert [TASKS["joint"].classes[i] for i in labels] == ["not_de", "down", "up", "not_de"]
    assert list(encode_labels(DE, DIRECTION, "de")) == [0, 1, 1, 0]
    assert list(encode_labels(DE[1:3], DIRECTION[1:3], "dir")) == [0, 1]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_certain_model_scores_each_pair_by_its_own_label(task):
    """Decoding the one-hot probabilities of the encoded labels gives back the file labels as scores."""
    keep = DE == 1 if get_task(task).de_pairs_only else np.ones(len(DE), bool)
    labels = encode_labels(DE[keep], DIRECTION[keep], task)
    probabilities = torch.nn.functional.one_hot(torch.as_tensor(labels), get_task(task).num_classes).float()
    scores = decode_scores(probabilities, task)
    assert tuple(scores) == get_task(task).scores
    if "de" in scores:
        assert scores["de"].tolist() == DE[keep].tolist()
    if "dir" in scores:
        moving = DE[keep] == 1
        assert scores["dir"][torch.as_tensor(moving)].tolist() == DIRECTION[keep][moving].tolist()


def test_joint_scores_give_de_and_direction():
    probs = torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.6, 0.3]])
    scores = decode_scores(probs, "joint")
    assert torch.allclose(scores["de"], torch.tensor([0.3, 0.9]))
    assert torch.allclose(scores["dir"], torch.tensor([2 / 3, 1 / 3]))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_decoding_logits_gives_the_softmax_scores(task):
    logits = torch.randn(200, get_task(task).num_classes, generator=torch.Generator().manual_seed(0)) * 4
    from_logits = decode_logits(logits, task)
    from_probabilities = decode_scores(torch.softmax(logits.double(), dim=-1), task)
    assert tuple(from_logits) == get_task(task).scores
    for key, value in from_logits.items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, from_probabilities[key], rtol=1e-12, atol=1e-12)


def test_pairs_with_equal_up_and_down_logits_get_equal_direction_scores():
    """Only the not-DE logit differs between the rows: the direction is the same, and decoding must not let
    the softmax's per-row normaliser round it apart (it does in float32)."""
    not_de = torch.linspace(-3.0, 9.0, 500)
    logits = torch.stack([not_de, torch.full_like(not_de, -1.3), torch.full_like(not_de, -0.2)], dim=1)
    assert decode_logits(logits, "joint")["dir"].unique().numel() == 1
    assert decode_scores(torch.softmax(logits, dim=-1), "joint")["dir"].unique().numel() > 1


def test_files_metrics_and_questions_per_task():
    assert get_task("de").files == ("de",) and get_task("dir").files == get_task("joint").files == ("de", "dir")
    assert headline_metrics("joint") == ("de_auroc_per_gene", "dir_auroc_per_gene")
    assert [primary_metric(t) for t in ("de", "dir", "joint")] == [
        "val/de_auroc_per_gene",
        "val/dir_auroc_per_gene",
        "val/de_auroc_per_gene",
    ]
    for question in QUESTIONS.values():
        assert question.format(pert="P1", gene="G1").endswith("Answer:") and "P1" in question.format(
            pert="P1", gene="G1"
        )


def test_an_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match="data.task must be one of de, dir, joint, got 'both'"):
        get_task("both")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_class_of_an_outcome_code_is_the_label_the_task_encodes(task):
    from perturb_models.tasks import outcome_codes

    t = get_task(task)
    rows = slice(1, 3) if t.de_pairs_only else slice(None)
    de, direction = DE[rows], DIRECTION[rows]
    assert list(t.class_of_outcome(outcome_codes(de, direction))) == list(encode_labels(de, direction, task))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_probabilities_invert_the_decoded_scores(task):
    t = get_task(task)
    probs = torch.softmax(torch.randn(32, t.num_classes, generator=torch.Generator().manual_seed(0)), dim=-1)
    scores = t.decode(probs.double())
    assert set(scores) == set(t.scores)
    torch.testing.assert_close(t.probabilities(scores), probs.double())


def test_scored_pairs_select_the_same_pairs_from_arrays_and_tensors():
    from perturb_models.tasks import scored_pairs

    for benchmark_task, expected in (("de", [True] * 4), ("dir", [False, True, True, False])):
        keep, target = scored_pairs(benchmark_task, DE, DIRECTION)
        keep_t, target_t = scored_pairs(benchmark_task, torch.as_tensor(DE), torch.as_tensor(DIRECTION))
        assert list(keep) == expected == keep_t.tolist()
        assert list(target[keep]) == target_t[keep_t].tolist()
    with pytest.raises(ValueError, match="de or dir"):
        scored_pairs("joint", DE, DIRECTION)
