"""DataModule: labels per task, the validation split, batches sliced from whole-split tensors."""

import json

import numpy as np
import pytest
import torch

from perturb_models.data.datamodule import PerturbQADataModule, SplitBatchSampler
from perturb_models.data.perturbqa import DataValidationError
from perturb_models.data.synthetic import make_synthetic_tables


def synthetic_dm(**kwargs) -> PerturbQADataModule:
    dm = PerturbQADataModule(name="synthetic", synthetic={"seed": 3}, **kwargs)
    dm.setup()
    return dm


def test_validation_split_is_seeded_perturbation_disjoint_and_from_train_only():
    dm = synthetic_dm(seed=1, val_fraction=0.2)
    ctx = dm.context
    assert not set(ctx.val_perts) & set(ctx.train_perts)
    assert not set(ctx.val_perts) & set(ctx.test_perts)
    assert set(dm.frames["val"]["pert"]) == set(ctx.val_perts)
    de, _ = make_synthetic_tables(seed=3)
    original_train = set(de.loc[de["split"] == "train", "pert"])
    assert set(ctx.val_perts) | set(ctx.train_perts) == original_train
    assert len(ctx.val_perts) == round(0.2 * len(original_train))
    assert synthetic_dm(seed=1, val_fraction=0.2).context.val_perts == ctx.val_perts
    assert synthetic_dm(seed=2, val_fraction=0.2).context.val_perts != ctx.val_perts


def test_saved_split_reloads_the_same_validation_perturbations(tmp_path):
    dm = synthetic_dm(seed=5)
    dm.save_split(tmp_path / "split.json")
    reloaded = synthetic_dm(seed=99, split_file=str(tmp_path / "split.json"))
    assert reloaded.context.val_perts == dm.context.val_perts
    record = json.loads((tmp_path / "split.json").read_text())
    record["val_perts"].append(record["test_perts"][0])
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(DataValidationError, match="is not a training perturbation"):
        synthetic_dm(split_file=str(tmp_path / "bad.json"))


def test_joint_labels_encode_de_and_direction():
    dm = synthetic_dm()
    frame = dm.frames["train"]
    assert (frame.loc[frame["de"] == 0, "label"] == 0).all()
    assert (frame.loc[(frame["de"] == 1) & (frame["dir"] == 0), "label"] == 1).all()
    assert (frame.loc[(frame["de"] == 1) & (frame["dir"] == 1), "label"] == 2).all()


def test_dir_task_keeps_only_de_positive_pairs():
    dm = synthetic_dm(task="dir")
    for frame in dm.frames.values():
        assert (frame["de"] == 1).all() and set(frame["label"]) <= {0, 1}


def test_training_pairs_exclude_validation_and_test_perturbations():
    dm = synthetic_dm()
    perts = set(dm.context.train_pairs["pert"])
    assert perts == set(dm.context.train_perts)


def test_batches_are_dicts_of_tensors_sliced_from_the_split():
    dm = synthetic_dm(batch_size=64)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == len(dm.splits["train"])
    first = batches[0]
    assert set(first) == {"pert", "gene", "label", "de", "dir"}
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.long for v in first.values())
    rows = torch.cat([b["pert"] * 10_000 + b["gene"] for b in batches])
    assert len(torch.unique(rows)) == len(rows)


def test_shuffle_changes_with_epoch_and_is_reproducible():
    sampler = SplitBatchSampler(100, 10, shuffle=True, seed=0)
    epoch0 = torch.cat(list(sampler))
    sampler.set_epoch(1)
    epoch1 = torch.cat(list(sampler))
    sampler.set_epoch(0)
    assert torch.equal(torch.cat(list(sampler)), epoch0)
    assert not torch.equal(epoch0, epoch1)


@pytest.mark.parametrize("n", [97, 100])
def test_evaluation_shards_cover_every_row_once_across_ranks(n):
    shards = [torch.cat(list(SplitBatchSampler(n, 8, shuffle=False, rank=r, world_size=3))) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    assert [len(SplitBatchSampler(n, 8, shuffle=False, rank=r, world_size=3)) for r in range(3)] == [
        int(np.ceil(len(s) / 8)) for s in shards
    ]


def test_training_shards_have_equal_length_across_ranks():
    lengths = {
        len(torch.cat(list(SplitBatchSampler(97, 8, shuffle=True, rank=r, world_size=3, equal_shards=True))))
        for r in range(3)
    }
    assert lengths == {32}


def _grouped_rows(seed: int = 0, genes: int = 13, rows: int = 230):
    generator = torch.Generator().manual_seed(seed)
    gene = torch.randint(0, genes, (rows,), generator=generator)
    label = (torch.rand(rows, generator=generator) < 0.2).long() + (torch.rand(rows, generator=generator) < 0.1).long()
    return gene, label


def test_gene_runs_hold_one_gene_each_and_deal_its_outcomes_evenly():
    from perturb_models.data.datamodule import gene_runs

    gene, label = _grouped_rows()
    runs = gene_runs(gene, label, 4, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(runs).tolist()) == list(range(len(gene)))  # every row once
    assert all(len(r) <= 4 and len(set(gene[r].tolist())) == 1 for r in runs)
    for g in range(13):
        mine = [r for r in runs if int(gene[r[0]]) == g]
        assert len(mine) == int(np.ceil(int((gene == g).sum()) / 4))
        for cls in (0, 1, 2):  # each class spread over the gene's runs: counts differ by at most one
            counts = [int((label[r] == cls).sum()) for r in mine]
            assert max(counts) - min(counts) <= 1, (g, cls, counts)
    # Runs of a gene with both outcomes mostly hold both (what the ranking term needs).
    mixed_genes = [g for g in range(13) if len(set(label[gene == g].tolist())) > 1]
    mixed_runs = [r for r in runs if int(gene[r[0]]) in mixed_genes]
    assert sum(len(set(label[r].tolist())) > 1 for r in mixed_runs) >= 0.8 * len(mixed_runs)


def test_gene_grouped_shuffle_is_seeded_per_epoch_and_keeps_batches_whole_across_ranks():
    gene, label = _grouped_rows()
    options = dict(shuffle=True, seed=1, genes=gene, labels=label, group_size=4)
    sampler = SplitBatchSampler(len(gene), 16, **options)
    epoch0 = torch.cat(list(sampler))
    assert sorted(epoch0.tolist()) == list(range(len(gene)))
    sampler.set_epoch(1)
    assert not torch.equal(torch.cat(list(sampler)), epoch0)
    sampler.set_epoch(0)
    assert torch.equal(torch.cat(list(sampler)), epoch0)
    # Three ranks: whole batches of the one-process order in turn, equal lengths, no row twice.
    shards = [
        list(SplitBatchSampler(len(gene), 16, rank=r, world_size=3, equal_shards=True, **options)) for r in range(3)
    ]
    rows = [torch.cat(batches) for batches in shards]
    assert {len(r) for r in rows} == {len(gene) // 3}
    assert [len(b) for b in shards] == [
        len(SplitBatchSampler(len(gene), 16, rank=r, world_size=3, equal_shards=True, **options)) for r in range(3)
    ]
    assert len(set(torch.cat(rows).tolist())) == len(torch.cat(rows))
    whole = [epoch0[i : i + 16] for i in range(0, len(epoch0), 16)]
    assert torch.equal(shards[1][0], whole[1]) and torch.equal(shards[2][1], whole[5])


def test_gene_group_size_of_one_is_rejected():
    with pytest.raises(ValueError, match="gene_group_size must be 0"):
        PerturbQADataModule(name="synthetic", gene_group_size=1)


def test_bad_task_and_val_fraction_are_rejected():
    with pytest.raises(ValueError, match="data.task must be one of de, dir, joint"):
        PerturbQADataModule(name="synthetic", task="both")
    with pytest.raises(ValueError, match=r"data.val_fraction must be in \(0, 1\)"):
        synthetic_dm(val_fraction=0.0)


@pytest.mark.parametrize("task", ["de", "dir", "joint"])
def test_test_gene_subset_keeps_every_pair_of_seeded_scorable_genes(task):
    full = PerturbQADataModule(name="synthetic", task=task)
    full.setup()
    dm = PerturbQADataModule(name="synthetic", task=task, test_genes=7, val_genes=3, seed=5)
    dm.setup()
    test, whole = dm.frames["test"], full.frames["test"]
    genes = set(test["gene"])
    assert len(genes) == 7 and len(dm.frames["val"]["gene"].unique()) == 3
    # Every test pair of a chosen gene, nothing else.
    assert len(test) == int(whole["gene"].isin(genes).sum()) and len(dm.splits["test"]) == len(test)
    for gene in genes:  # per-gene AUROC defined for each chosen gene
        rows = test.loc[test["gene"] == gene]
        if task in ("de", "joint"):
            assert rows["de"].nunique() == 2
        if task in ("dir", "joint"):
            assert rows.loc[rows["de"] == 1, "dir"].nunique() == 2
    # The subset depends on subset_seed, not on the run seed: every seed scores the same genes.
    again = PerturbQADataModule(name="synthetic", task=task, test_genes=7, val_genes=3, seed=6)
    again.setup()
    assert set(again.frames["test"]["gene"]) == genes
    other = PerturbQADataModule(name="synthetic", task=task, test_genes=7, subset_seed=1)
    other.setup()
    assert set(other.frames["test"]["gene"]) != genes
    assert "NOT the official full-test figure" in dm.subset_notes["test"]


def test_max_train_perts_subsamples_fitting_pairs_but_not_the_context():
    full = PerturbQADataModule(name="synthetic", task="de")
    full.setup()
    dm = PerturbQADataModule(name="synthetic", task="de", max_train_perts=5)
    dm.setup()
    assert dm.frames["train"]["pert"].nunique() == 5
    kept = set(dm.frames["train"]["pert"])
    assert len(dm.frames["train"]) == int(full.frames["train"]["pert"].isin(kept).sum())
    # Graphs and retrieval still see every training pair.
    assert len(dm.context.train_pairs) == len(full.frames["train"])
    assert dm.frames["test"].equals(full.frames["test"])
    with pytest.raises(ValueError, match="data.test_genes"):
        PerturbQADataModule(name="synthetic", task="de", test_genes=0)
