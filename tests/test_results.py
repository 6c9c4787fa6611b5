"""The quality tables: docs/results.md and the README's block come from benchmarks/results/quality.csv
through one function (benchmarks/docs_tables.py), so neither can drift from the CSV (or from each other)."""

from __future__ import annotations

import sys

import pandas as pd
import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from docs_tables import (  # noqa: E402
    LLM_DOC,
    QUALITY_CSV,
    README,
    README_BEGIN,
    README_END,
    RESULTS_DOC,
    quality_table,
    read_quality_rows,
    read_throughput_rows,
    results_doc,
    throughput_table,
    with_llm_block,
    with_llm_speed_block,
    with_readme_block,
    write_doc,
)


def test_docs_results_page_is_generated_from_quality_csv():
    assert RESULTS_DOC.read_text() == results_doc(read_quality_rows(QUALITY_CSV)), (
        "docs/results.md differs from quality.csv: run python benchmarks/docs_tables.py"
    )


def test_readme_results_block_is_generated_from_quality_csv():
    text = README.read_text()
    assert text == with_readme_block(text, quality_table(read_quality_rows(QUALITY_CSV))), (
        "README's results table differs from quality.csv: run python benchmarks/docs_tables.py"
    )


def test_llm_page_table_is_generated_from_quality_csv():
    text = LLM_DOC.read_text()
    assert text == with_llm_block(text, read_quality_rows(QUALITY_CSV)), (
        "docs/llm.md's quality table differs from quality.csv: run python benchmarks/llm_quality.py --csv "
        "benchmarks/results/quality.csv --table"
    )


def test_llm_page_speed_table_is_generated_from_the_throughput_json():
    text = LLM_DOC.read_text()
    assert text == with_llm_speed_block(text, read_throughput_rows()), (
        "docs/llm.md's speed table differs from benchmarks/results/llm_throughput.json: run python "
        "benchmarks/llm_throughput.py --table"
    )


def test_summer_page_speed_block_is_generated_from_the_speed_json():
    import json

    import summer_speed

    result = json.loads(summer_speed.RESULTS.read_text()) if summer_speed.RESULTS.exists() else {}
    text = summer_speed.DOC.read_text()
    assert text == summer_speed.replace_block(
        text, summer_speed.block(result), summer_speed.BEGIN, summer_speed.END, summer_speed.DOC
    ), (
        "docs/summer.md's speed block differs from benchmarks/results/summer_speed.json: run python "
        "benchmarks/summer_speed.py --table"
    )


def test_throughput_table_shows_load_and_gpu_only_columns():
    row = {
        "model": "smollm2",
        "device": "CPU x2 threads",
        "batch_size": 8,
        "prompt_tokens_mean": 175.2,
        "tokens_per_s": 1234.5,
        "pairs_per_s": 0.5,
        "load_average": 1.04,
    }
    table = throughput_table(
        [row, {**row, "device": "H200", "mfu": 0.123, "max_memory_gib": 3.0, "load_average": None}]
    )
    assert "| smollm2 | CPU x2 threads | 1.0 | 8 | 175 | 1,234 | 0.5 | – | – |" in table
    assert "| smollm2 | H200 | – | 8 | 175 | 1,234 | 0.5 | 12.3% | 3.0 |" in table


def test_rewriting_changes_only_the_marked_block(tmp_path):
    rows = pd.DataFrame(
        {
            "model": ["m", "m"],
            "dataset": ["k562", "k562"],
            "task": ["de", "de"],
            "seed": [0, 1],
            "auroc_per_gene": [0.6, 0.7],
        }
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\nrest\n")
    write_doc(rows, tmp_path / "results.md", readme)
    text = readme.read_text()
    assert text.startswith(f"intro\n{README_BEGIN}\n") and text.endswith(f"{README_END}\nrest\n")
    assert "| m | 0.650 ± 0.071 (2) |" in text and "old table" not in text
    assert "| m | 0.650 ± 0.071 (2) |" in (tmp_path / "results.md").read_text()
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no results block to rewrite"):
        write_doc(rows, tmp_path / "results.md", readme)


def test_a_cell_shows_the_mean_of_the_seeds_intervals_and_how_many_seeds_have_one(tmp_path):
    rows = pd.DataFrame(
        {
            "model": "knn",
            "dataset": "k562",
            "task": "de",
            "seed": [0, 1, 2],
            "auroc_per_gene": [0.60, 0.62, 0.64],
            "ci_low": [0.58, 0.60, float("nan")],
            "ci_high": [0.62, 0.66, float("nan")],
            "overrides": "",
        }
    )
    table = quality_table(rows)
    assert "| knn | 0.620 ± 0.020 (3) [0.590, 0.640; 2 of 3 seeds] |" in table
    assert "[95% interval]" in table
    write_doc(rows, tmp_path / "results.md")
    assert (tmp_path / "results_auroc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![per-gene AUROC by model and cell line](results_auroc.png)" in (tmp_path / "results.md").read_text()


def test_rows_made_with_an_older_symbol_resolution_are_marked_until_rerun():
    from docs_tables import RESOLUTION_VERSION, quality_table

    rows = pd.DataFrame(
        {
            "model": ["knn", "knn", "gears", "mlp"],
            "dataset": "k562",
            "task": "de",
            "seed": [0, 1, 0, 0],
            "auroc_per_gene": [0.64, 0.65, 0.66, 0.49],
            # empty: a row from before the column, made with version 1
            "resolution": [float("nan"), RESOLUTION_VERSION, RESOLUTION_VERSION, float("nan")],
        }
    )
    table = quality_table(rows)
    assert "| knn | 0.645 ± 0.007 (2) † |" in table  # one stale seed marks the cell
    assert "| gears | 0.660 (1) |" in table
    assert "| mlp | 0.490 (1) |" in table  # reads no gene knowledge: nothing to rerun
    assert "† made with an older symbol resolution" in table
    assert "†" not in quality_table(rows.assign(resolution=RESOLUTION_VERSION))
    assert "†" in quality_table(rows.assign(resolution=RESOLUTION_VERSION - 1))


def test_the_rerun_note_names_the_gpu_lease_for_rows_made_on_a_gpu():
    from docs_tables import quality_table

    rows = pd.DataFrame(
        {
            "model": ["knn", "lora_llama"],
            "dataset": "k562",
            "task": "de",
            "seed": [0, 0],
            "auroc_per_gene": [0.64, 0.59],
            "resolution": [float("nan"), float("nan")],
            "overrides": ["", "model=lora_llama trainer=gpu trainer.limit_train_batches=127"],
        }
    )
    both = quality_table(rows)
    assert "quality.py --rerun-stale" in both and "GPU-made rows (lora_llama)" in both
    gpu_only = quality_table(rows.iloc[1:])
    assert "quality.py --rerun-stale" not in gpu_only and "benchmarks/gpu_checks.py" in gpu_only
