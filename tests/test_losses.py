import math

import pytest
import torch

from perturb_models.losses import within_gene_rank_loss


def _brute_force(logits, labels, genes, task):
    def pairwise(score, positive, negative):
        losses = [
            math.log1p(math.exp(float(score(j) - score(i))))
            for i in range(len(labels))
            for j in range(len(labels))
            if genes[i] == genes[j] and positive(i) and negative(j)
        ]
        return sum(losses) / len(losses) if losses else None

    if task == "joint":
        terms = [
            pairwise(
                lambda r: torch.logsumexp(logits[r, 1:], 0) - logits[r, 0],
                lambda r: labels[r] > 0,
                lambda r: labels[r] == 0,
            ),
            pairwise(lambda r: logits[r, 2] - logits[r, 1], lambda r: labels[r] == 2, lambda r: labels[r] == 1),
        ]
    else:
        terms = [pairwise(lambda r: logits[r, 1] - logits[r, 0], lambda r: labels[r] == 1, lambda r: labels[r] == 0)]
    present = [t for t in terms if t is not None]
    return sum(present) / len(present) if present else 0.0


@pytest.mark.parametrize("task,classes", [("joint", 3), ("de", 2), ("dir", 2)])
def test_rank_loss_is_the_mean_logistic_loss_over_same_gene_pairs_of_different_outcome(task, classes):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(24, classes, generator=generator)
    labels = torch.randint(0, classes, (24,), generator=generator)
    genes = torch.randint(0, 4, (24,), generator=generator)
    assert float(within_gene_rank_loss(logits, labels, genes, task)) == pytest.approx(
        _brute_force(logits, labels, genes, task), rel=1e-5
    )


def test_rank_loss_ignores_shifts_shared_by_a_genes_pairs_and_pairs_of_different_genes():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 3, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0])
    genes = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    base = within_gene_rank_loss(logits, labels, genes, "joint")
    # One shift of the DE log-odds per gene (down and up moved together, so direction is unchanged too).
    shift = torch.tensor([[0.0, 1.0, 1.0], [3.0, 0.5, 0.5], [-1.0, 2.0, 2.0]])[genes]
    assert float(within_gene_rank_loss(logits + shift, labels, genes, "joint")) == pytest.approx(float(base), rel=1e-5)
    # Cross-entropy does see such a shift: the ranking term is what aims at the per-gene AUROC.
    ce = torch.nn.functional.cross_entropy
    assert float(ce(logits + shift, labels)) != pytest.approx(float(ce(logits, labels)), rel=1e-3)
    # All genes different: nothing to compare, a zero that still backpropagates.
    lone = logits.clone().requires_grad_(True)
    zero = within_gene_rank_loss(lone, labels, torch.arange(12), "joint")
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(lone.grad, torch.zeros_like(lone))


def test_rank_loss_falls_when_a_genes_changed_pairs_score_above_its_unchanged_ones():
    labels = torch.tensor([1, 0, 1, 0])
    genes = torch.tensor([0, 0, 1, 1])
    right = torch.tensor([[0.0, 2.0], [0.0, -2.0], [0.0, 1.0], [0.0, -1.0]])
    assert float(within_gene_rank_loss(right, labels, genes, "de")) < float(
        within_gene_rank_loss(-right, labels, genes, "de")
    )


def test_training_loss_is_cross_entropy_plus_the_weighted_rank_term(synthetic_cfg):
    from perturb_models.builders import build_datamodule, build_model

    cfg = synthetic_cfg("model=mlp", "model.rank_weight=0.5", "data.gene_group_size=4")
    datamodule = build_datamodule(cfg.data)
    model = build_model(cfg, datamodule).eval()  # no dropout: both forwards see the same function
    model.log = lambda *args, **kwargs: None
    batch = next(iter(datamodule.train_dataloader()))
    # The training batches are runs of one gene: the term has pairs to compare.
    assert len(torch.unique(batch["gene"])) <= len(batch["gene"]) // 4 + 1
    loss = model.training_step(batch, 0)
    logits = model(batch)
    expected = model.loss_fn(logits, batch["label"]) + 0.5 * within_gene_rank_loss(
        logits, batch["label"], batch["gene"], "joint"
    )
    assert float(within_gene_rank_loss(logits, batch["label"], batch["gene"], "joint")) > 0
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    plain = build_model(synthetic_cfg("model=mlp"), datamodule).eval()
    plain.load_state_dict(model.state_dict())
    plain.log = model.log
    assert float(plain.training_step(batch, 0).detach()) == pytest.approx(
        float(model.loss_fn(logits, batch["label"]).detach()), rel=1e-6
    )
