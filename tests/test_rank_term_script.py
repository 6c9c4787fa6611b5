"""benchmarks/rank_term.py: the same model with and without the ranking term, compared on validation."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def rank_term(tmp_path, monkeypatch):
    monkeypatch.setenv("PERTURB_MODELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import rank_term

    yield rank_term
    sys.modules.pop("rank_term", None)


def test_rank_term_grid_stores_both_settings_skips_them_again_and_writes_the_doc_block(rank_term, tmp_path, capsys):
    csv = tmp_path / "r.csv"
    args = ["--csv", str(csv), "--models", "mlp", "--datasets", "synthetic", "--seeds", "0"]
    args += ["--settings", "0:0", "0.5:4", "--set", "trainer.max_epochs=2", "--runs-dir", str(tmp_path / "runs")]
    rank_term.main(args)
    rows = pd.read_csv(csv)
    assert len(rows) == 4 and set(rows["task"]) == {"de", "dir"}
    assert sorted(set(zip(rows["rank_weight"], rows["gene_group_size"]))) == [(0.0, 0), (0.5, 4)]
    ranked = rows.loc[rows["rank_weight"] == 0.5, "overrides"]
    assert all("model.rank_weight=0.5 data.gene_group_size=4" in o for o in ranked)
    assert rows["val_auroc_per_gene"].notna().all() and rows["auroc_per_gene"].notna().all()
    capsys.readouterr()
    rank_term.main(args)  # everything stored: nothing retrained
    assert capsys.readouterr().out.count("stored already") == 2
    doc = tmp_path / "rank_term.md"
    doc.write_text(f"intro\n\n{rank_term.BEGIN}\n\nold\n\n{rank_term.END}\n")
    rank_term.main(["--csv", str(csv), "--table", "--doc", str(doc)])
    text = doc.read_text()
    assert "| synthetic | mlp |" in text and "(best validation)" in text and "old" not in text
    assert "mlp on synthetic: validation mean" in text and "0.5:4 " in text


@pytest.mark.parametrize("setting", ["1", "1:1", "1:0", "-1:4", "a:b"])
def test_impossible_settings_are_refused_in_one_line(rank_term, tmp_path, capsys, setting):
    with pytest.raises(SystemExit):
        rank_term.main(["--csv", str(tmp_path / "r.csv"), "--settings", setting])
    assert "--settings" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_the_docs_block_matches_the_results_file():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import rank_term
    from quality import read_rows

    text = rank_term.DOC.read_text()
    rows = read_rows(REPO / "benchmarks" / "results" / "rank_term.csv", rank_term.COLUMNS)
    body = rank_term.rank_table(rows)
    verdict = rank_term.rank_verdict(rows) if not rows.empty else ""
    assert body in text and verdict in text
