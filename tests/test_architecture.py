"""docs/architecture.md's "Add a model" example, built from the doc's own code blocks, trains one step
and reloads through evaluate: the worked example stays true."""

from __future__ import annotations

import re
import sys

from perturb_models.evaluation import evaluate_checkpoint
from perturb_models.training import train
from tests.conftest import FAST_CPU, REPO, compose_config

DOC = REPO / "docs" / "architecture.md"


def doc_block(language: str, after: str) -> str:
    text = DOC.read_text()
    section = text[text.index(after) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block after {after!r} in {DOC}"
    return match.group(1)


def test_add_a_model_example_trains_and_reloads(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(doc_block("python", "## Add a model"))
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "dot.yaml").write_text(doc_block("yaml", "conf/model/dot.yaml"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        [
            "model=dot",
            "data=synthetic",
            *FAST_CPU,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.num_sanity_val_steps=0",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        ],
        run,
    )
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW" and cfg.model.optimizer.lr == 3.0e-3
    metrics = train(cfg)
    assert (run / "predictions" / "test.csv").is_file() and metrics["test/de_genes_scored"] > 0
    again = evaluate_checkpoint(
        run, tmp_path / "eval", compose_config("evaluate", FAST_CPU[1:], tmp_path / "eval").trainer
    )
    assert again["test/de_auroc_per_gene"] == metrics["test/de_auroc_per_gene"]


def test_add_a_kind_of_run_example_runs_through_train(tmp_path, monkeypatch):
    import json

    from perturb_models.runners import RUNNERS

    (tmp_path / "my_runs.py").write_text(doc_block("python", "## Add a kind of run"))
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "gene_prior.yaml").write_text(doc_block("yaml", "conf/model/gene_prior.yaml"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_runs", raising=False)
    monkeypatch.setattr("perturb_models.runners.RUNNERS", dict(RUNNERS))  # the example registers into a copy
    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        ["model=gene_prior", "data=synthetic", *FAST_CPU, f"hydra.searchpath=[file://{tmp_path / 'conf'}]"],
        run,
    )
    metrics = train(cfg)
    assert "zero_shot" not in RUNNERS, "the example must not leak into the real registry"
    assert json.loads((run / "run.json").read_text())["model"] == "gene_prior"
    assert (run / "predictions" / "test.csv").is_file() and not (run / "checkpoints").exists()
    # the per-gene prior knows which genes change often, but not which knockdown changes them: within a gene
    # every test pair gets the same score, so the per-gene AUROC is exactly chance
    assert metrics["test/de_auroc_per_gene"] == 0.5 and metrics["test/de_genes_scored"] > 0


def python_sources() -> list:
    return [p for folder in ("perturb_models", "benchmarks") for p in (REPO / folder).rglob("*.py")] + [
        REPO / "train.py",
        REPO / "evaluate.py",
    ]


def test_hydra_compose_and_the_trainer_are_built_in_one_place_each():
    """Benchmarks, helper CLIs and the package compose through config.compose_config and build Trainers
    through builders.build_trainer, so a run built anywhere is the run train.py builds."""
    composing = sorted(str(p.relative_to(REPO)) for p in python_sources() if "initialize_config_dir" in p.read_text())
    assert composing == ["perturb_models/config.py"]
    trainers = sorted(
        str(p.relative_to(REPO))
        for p in python_sources()
        if re.search(r"\b(L|pl|lightning)\.Trainer\(|\bTrainer\(", p.read_text())
    )
    assert trainers == [], f"Trainer built outside builders.build_trainer: {trainers}"


# Models only compute: the orchestration (training, evaluation, builders, outputs, runners) sits above them.
MODEL_CODE = ("perturb_models/models", "perturb_models/gse")
ORCHESTRATION = ("training", "evaluation", "builders", "outputs", "runners")


def imported_modules(path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_model_code_never_imports_the_orchestration():
    offenders = {}
    for folder in MODEL_CODE:
        for path in (REPO / folder).rglob("*.py"):
            bad = sorted(
                m
                for m in imported_modules(path)
                if any(m == f"perturb_models.{o}" or m.startswith(f"perturb_models.{o}.") for o in ORCHESTRATION)
            )
            if bad:
                offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}, f"model code imports the orchestration: {offenders}"


def test_training_and_evaluation_dispatch_to_runners_without_task_branches():
    for name in ("training.py", "evaluation.py"):
        text = (REPO / "perturb_models" / name).read_text()
        assert "GSE_TASK" not in text and 'task") ==' not in text, f"{name} branches on a task name"
        assert "runner_for" in text


def test_every_runner_is_registered_under_its_name_and_every_model_class_names_one():
    from hydra.utils import get_class

    from perturb_models.runners import RUNNERS, Runner

    assert all(isinstance(r, Runner) and key == r.name and r.tasks for key, r in RUNNERS.items())
    import yaml

    targets = set()
    for path in (REPO / "conf" / "model").glob("*.yaml"):
        model = yaml.safe_load(path.read_text())
        for key in ("encoder", "namer"):
            target = (model.get(key) or {}).get("_target_") if isinstance(model.get(key), dict) else None
            if target and target != "???":  # a shared base leaves the class to the model that extends it
                targets.add(target)
    assert targets, "no model class found in conf/model"
    for target in sorted(targets):
        assert getattr(get_class(target), "runner", None) in RUNNERS, f"{target} names no registered runner"


LLM_PACKAGE = "perturb_models.models.llm"


def _llm_private_uses(path) -> list[str]:
    """``name`` for each private name (leading underscore, not dunder) that ``path`` takes from the LLM
    package: ``from perturb_models.models.llm[.x] import _name``, or ``alias._name`` on a module of it."""
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()  # local names bound to the package or one of its modules
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if node.module == LLM_PACKAGE or node.module.startswith(LLM_PACKAGE + "."):
                    if alias.name.startswith("_"):
                        found.append(alias.name)
                    modules.add(alias.asname or alias.name)  # a module or a name: attributes checked below
                elif f"{node.module}.{alias.name}" == LLM_PACKAGE:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == LLM_PACKAGE or alias.name.startswith(LLM_PACKAGE + "."):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_nothing_outside_the_llm_package_uses_its_private_names():
    """perturb_models/models/llm/__init__.py is the LLM code's API: the namer, the backends, benchmarks
    and tests import public names only."""
    inside = REPO / "perturb_models" / "models" / "llm"
    sources = [p for folder in ("perturb_models", "benchmarks", "tests") for p in (REPO / folder).rglob("*.py")]
    sources += sorted(REPO.glob("*.py"))
    offenders = {
        str(p.relative_to(REPO)): names for p in sources if inside not in p.parents and (names := _llm_private_uses(p))
    }
    assert offenders == {}


def test_lora_config_is_built_in_one_place():
    """The classifier and the namer share one LoRA builder (models/llm/lora.py): same defaults for both."""
    building = sorted(str(p.relative_to(REPO)) for p in python_sources() if re.search(r"\bLoraConfig\(", p.read_text()))
    assert building == ["perturb_models/models/llm/lora.py"]
