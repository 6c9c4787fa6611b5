"""Gene text recipe on hand-written gene_info / gene2go / OBO files: content, order, budget, clusters,
missing genes, recipe versioning and the command line."""

from __future__ import annotations

import gzip

import pytest

from perturb_models.knowledge.text import TextRecipe, build_gene_texts, cluster_text, main
from tests.knowledge_files import write_knowledge

GENE2GO_HEADER = "#tax_id\tGeneID\tGO_ID\tEvidence\tQualifier\tGO_term\tPubMed\tCategory"


@pytest.fixture
def knowledge(tmp_path):
    folder = write_knowledge(
        tmp_path / "k",
        [
            (1, "AAA1", "OLDA|'OLDA|A-ONE", "alpha gene one"),
            (2, "BBB2", "", "beta gene two"),
            (3, "CCC3", "", "gamma gene"),
        ],
        [],
    )
    rows = [  # GeneID, GO id, qualifier, term name, category
        (1, "GO:0000002", "-", "zeta process", "Process"),
        (1, "GO:0000001", "-", "alpha process", "Process"),
        (1, "GO:0000005", "-", "kinase activity", "Function"),
        (1, "GO:0000007", "-", "nucleus", "Component"),
        (1, "GO:0000006", "NOT", "forbidden activity", "Function"),
        (2, "GO:0000005", "-", "kinase activity", "Function"),
        *[
            (3, f"GO:00001{i:02d}", "-", f"{name} process", "Process")
            for i, name in enumerate(["zeta", "alpha", "beta", "delta", "epsilon", "gamma"])
        ],
        (3, "GO:0000005", "-", "kinase activity", "Function"),
        (3, "GO:0000007", "-", "nucleus", "Component"),
    ]
    lines = [GENE2GO_HEADER] + [f"9606\t{g}\t{go}\tIDA\t{q}\t{name}\t-\t{cat}" for g, go, q, name, cat in rows]
    with gzip.open(folder / "gene2go.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return folder


def test_text_names_symbol_full_name_clean_synonyms_and_go_terms_in_alphabetical_order(knowledge):
    texts = build_gene_texts(["AAA1", "BBB2"], knowledge, allow_download=False).texts
    assert texts["AAA1"] == (
        "Gene AAA1: alpha gene one. Also known as OLDA, A-ONE. Type: protein coding. "
        "Biological processes: alpha process, zeta process. Molecular functions: kinase activity. "
        "Cellular components: nucleus."
    )
    assert texts["BBB2"].endswith("Molecular functions: kinase activity.")


def test_not_qualified_annotations_are_left_out(knowledge):
    assert "forbidden" not in build_gene_texts(["AAA1"], knowledge, allow_download=False).texts["AAA1"]


def test_renamed_symbol_resolves_through_synonym_and_names_the_official_symbol(knowledge):
    texts = build_gene_texts(["OLDA"], knowledge, allow_download=False)
    assert texts.has_knowledge["OLDA"]
    assert texts.texts["OLDA"].startswith("Gene OLDA: alpha gene one. Also known as AAA1, A-ONE.")


def test_unknown_symbol_gets_name_only_text_and_is_flagged(knowledge):
    texts = build_gene_texts(["AAA1", "NOPE9"], knowledge, allow_download=False)
    assert texts.texts["NOPE9"] == "Gene NOPE9."
    assert texts.missing() == ["NOPE9"] and texts.info["genes_missing"] == 1


def test_definitions_come_from_the_obo(knowledge):
    text = build_gene_texts(["AAA1"], knowledge, TextRecipe(definitions=True), allow_download=False).texts["AAA1"]
    # OBO names replace gene2go's labels; each term carries its definition.
    assert "parent process (The parent)" in text and "a function (Some function)" in text


def test_length_budget_cuts_at_term_boundaries_and_keeps_every_aspect(knowledge):
    full = build_gene_texts(["CCC3"], knowledge, allow_download=False).texts["CCC3"]
    short = build_gene_texts(["CCC3"], knowledge, TextRecipe(max_chars=160), allow_download=False).texts["CCC3"]
    assert len(short) <= 160 < len(full)
    assert short == (
        "Gene CCC3: gamma gene. Type: protein coding. Biological processes: alpha process. "
        "Molecular functions: kinase activity. Cellular components: nucleus."
    )


def test_text_is_deterministic_and_recipe_version_tracks_parameters(knowledge):
    a = build_gene_texts(["BBB2", "AAA1"], knowledge, allow_download=False).texts
    b = build_gene_texts(["AAA1", "BBB2"], knowledge, allow_download=False).texts
    assert a == b
    assert TextRecipe().version == TextRecipe().version
    assert TextRecipe(max_chars=10).version != TextRecipe().version
    assert TextRecipe().version.startswith("gene-text-v")
    with pytest.raises(ValueError, match="unknown gene-text option"):
        TextRecipe.from_mapping({"max_char": 3})


def test_clusters_get_their_name_and_sorted_members(knowledge):
    texts = build_gene_texts(
        ["AAA1", "12-oxidative phosphorylation"],
        knowledge,
        clusters={"12-oxidative phosphorylation": ["BBB2", "AAA1"]},
        allow_download=False,
    )
    assert (
        texts.texts["12-oxidative phosphorylation"]
        == "Gene cluster oxidative phosphorylation. Member genes: AAA1, BBB2."
    )
    assert texts.has_knowledge["12-oxidative phosphorylation"]
    assert len(cluster_text("1-x", [f"G{i}" for i in range(500)], TextRecipe(max_chars=100))) <= 100


def test_command_line_prints_the_text_of_a_gene(knowledge, capsys):
    assert main(["AAA1", "NOPE9", "--root", str(knowledge), "--no-download"]) == 0
    out = capsys.readouterr().out
    assert "Gene AAA1: alpha gene one." in out and "NOPE9  [not in gene_info]" in out and "# recipe gene-text-v" in out
