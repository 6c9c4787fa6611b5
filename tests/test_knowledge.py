"""Knowledge readers: gene_info, gene2go, GAF and OBO on hand-written files; symbol resolution;
download from a local HTTP server; coverage of the real files."""

from __future__ import annotations

import gzip

import pytest

from perturb_models.knowledge import (
    GODag,
    KnowledgeFileError,
    SymbolResolver,
    gene_term_sets,
    knowledge_file,
    read_gaf,
    read_gene2go,
    read_gene_info,
    read_obo,
)
from perturb_models.knowledge.__main__ import main as knowledge_cli
from tests.knowledge_files import OBO_TEXT, gene2go_text, gene_info_text, write_knowledge

GENES = [
    (1, "AARS1", "AARS|CMT2N", "alanyl-tRNA synthetase 1"),
    (2, "GARS1", "GARS|CMT2D", "glycyl-tRNA synthetase 1"),
    (3, "GART", "GARS|AIRS|PGFT", "phosphoribosylglycinamide formyltransferase"),
    (4, "TAFAZZIN", "TAZ", "tafazzin"),
    (5, "WWTR1", "TAZ", "WW domain containing transcription regulator 1"),
    (6, "ABC", "-", "plain gene"),
]


def test_read_gene_info_parses_symbols_synonyms_description_and_ensembl(tmp_path):
    path = tmp_path / "gi.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(gene_info_text(GENES))
    frame = read_gene_info(path)
    assert list(frame["gene_id"]) == [1, 2, 3, 4, 5, 6]
    assert frame.loc[0, "symbol"] == "AARS1"
    assert frame.loc[0, "synonyms"] == ["AARS", "CMT2N"]
    assert frame.loc[5, "synonyms"] == []
    assert frame.loc[2, "description"] == "phosphoribosylglycinamide formyltransferase"
    assert frame.loc[0, "type_of_gene"] == "protein-coding"
    assert frame.loc[0, "ensembl"] == "ENSG00000000001"


def test_read_gene_info_rejects_a_file_without_its_header(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("GeneID\tSymbol\n1\tA\n")
    with pytest.raises(ValueError, match="not an NCBI gene_info file"):
        read_gene_info(path)


def test_symbols_resolve_through_synonyms_for_renamed_genes_and_report_coverage(tmp_path):
    path = tmp_path / "gi"
    path.write_text(gene_info_text(GENES))
    resolver = SymbolResolver(read_gene_info(path))
    report = resolver.resolve_many(["AARS1", "AARS", "GARS", "TAZ", "NOPE", "ABC", "ENSG00000000006"])
    assert report.by_symbol == {"AARS1": 1, "ABC": 6}
    # AARS is a synonym of one gene; GARS of two, but only GARS1 extends the old symbol.
    assert report.by_synonym == {"AARS": 1, "GARS": 2}
    assert report.by_ensembl == {"ENSG00000000006": 6}
    assert report.ambiguous == {"TAZ": [4, 5]}
    assert sorted(report.missing) == ["NOPE", "TAZ"]
    assert report.found == 5 and report.total == 7
    text = report.summary("dataset")
    assert "5/7 found" in text and "NOPE" in text and "AARS->1" in text
    assert resolver.resolve("CMT2N") == 1 and resolver.resolve("TAZ") is None


def test_dataset_ensembl_ids_settle_ambiguous_symbols_and_mt_symbols_resolve_without_the_hyphen(tmp_path):
    path = tmp_path / "gi"
    path.write_text(gene_info_text([*GENES, (7, "COX1", "MTCO1|COI", "cytochrome c oxidase I")]))
    resolver = SymbolResolver(read_gene_info(path))
    hints = {"TAZ": "ENSG00000000004", "OLD.1": "ENSG00000000006", "AARS": "ENSG00000000006"}
    report = resolver.resolve_many(["TAZ", "OLD.1", "AARS", "MT-CO1"], hints)
    # The hint picks one of TAZ's two candidates and names a retired locus; it never overrides a
    # symbol that gene_info settles alone (AARS stays a synonym of AARS1).
    assert report.by_ensembl == {"TAZ": 4, "OLD.1": 6}
    assert report.by_synonym == {"AARS": 1, "MT-CO1": 7}
    assert report.missing == [] and report.found == 4
    # A hint naming neither candidate settles nothing: the symbol is reported with both, never guessed.
    refused = resolver.resolve_many(["TAZ"], {"TAZ": "ENSG00000000001"})
    assert refused.missing == ["TAZ"] and refused.ambiguous == {"TAZ": [4, 5]}
    assert "TAZ (GeneIDs 4, 5)" in refused.summary()


def test_read_gene2go_keeps_one_species_and_maps_categories_to_aspects(tmp_path):
    path = tmp_path / "gene2go"
    path.write_text(
        gene2go_text(
            [
                (1, "GO:0000002", "IDA", "Process"),
                (1, "GO:0000005", "IEA", "Function"),
                (2, "GO:0000007", "ND", "Component"),
            ],
            qualifier={(1, "GO:0000005"): "NOT enables"},
        )
    )
    frame = read_gene2go(path)
    assert len(frame) == 3 and set(frame["gene"]) == {1, 2}
    assert list(frame["aspect"]) == ["P", "F", "C"]
    assert frame.loc[1, "qualifier"] == "NOT enables" and frame.loc[0, "qualifier"] == ""
    sets = gene_term_sets(frame)
    assert sets == {1: frozenset({"GO:0000002"}), 2: frozenset({"GO:0000007"})}  # NOT dropped
    assert gene_term_sets(frame, exclude_evidence=["ND"]) == {1: frozenset({"GO:0000002"})}
    assert gene_term_sets(frame, aspects=["cellular_component"]) == {2: frozenset({"GO:0000007"})}


def test_read_gaf_reads_symbol_term_evidence_and_aspect(tmp_path):
    path = tmp_path / "goa_human.gaf"
    row = (
        "UniProtKB\tP49588\tAARS1\t{q}\t{go}\tPMID:1\t{ev}\t\t{asp}\talanyl-tRNA synthetase\tAARS|CMT2N\tprotein\t"
        "taxon:9606\t20220101\tUniProt\t\t"
    )
    path.write_text(
        "!gaf-version: 2.2\n!comment\n"
        + "\n".join(
            [
                row.format(q="enables", go="GO:0000005", ev="IDA", asp="F"),
                row.format(q="involved_in", go="GO:0000099", ev="IMP", asp="P"),
            ]
        )
        + "\n"
    )
    frame = read_gaf(path)
    assert list(frame["gene"]) == ["AARS1", "AARS1"]
    assert list(frame["evidence"]) == ["IDA", "IMP"] and list(frame["aspect"]) == ["F", "P"]
    assert frame.loc[0, "synonyms"] == ["AARS", "CMT2N"]
    ontology = read_obo(_obo(tmp_path))
    # The alt id GO:0000099 maps onto its primary term GO:0000002.
    assert gene_term_sets(frame, ontology=ontology) == {"AARS1": frozenset({"GO:0000005", "GO:0000002"})}


def test_read_gaf_names_the_line_of_a_malformed_row(tmp_path):
    path = tmp_path / "bad.gaf"
    path.write_text("!gaf-version: 2.2\nUniProtKB\tX\tY\n")
    with pytest.raises(ValueError, match="line 2"):
        read_gaf(path)


def _obo(tmp_path):
    path = tmp_path / "go.obo"
    path.write_text(OBO_TEXT)
    return path


def test_read_obo_parses_terms_definitions_and_relationships(tmp_path):
    terms = read_obo(_obo(tmp_path))
    child = terms["GO:0000002"]
    assert child.name == "child process" and child.namespace == "biological_process" and child.aspect == "P"
    assert child.definition == 'A child of the parent, with a \\"quote\\".'
    assert child.is_a == ["GO:0000001"] and child.part_of == ["GO:0000003"]
    assert terms["GO:0000004"].regulates == ["GO:0000002"]
    assert terms["GO:0000099"] is child  # alt id
    assert "part_of" not in terms  # [Typedef] stanzas are not terms
    assert len({t.id for t in terms.values()}) == 8


def test_annotations_propagate_up_is_a_and_part_of_but_not_regulates(tmp_path):
    terms = read_obo(_obo(tmp_path))
    dag = GODag(terms)
    assert dag.ancestors("GO:0000002") == {"GO:0000001", "GO:0000003", "GO:0008150"}
    assert dag.ancestors("GO:0000004") == {"GO:0008150"}
    assert GODag(terms, ("is_a", "part_of", "regulates")).ancestors("GO:0000004") >= {"GO:0000002", "GO:0000001"}
    table = read_gene2go(_write(tmp_path / "g2g", gene2go_text([(1, "GO:0000002", "IDA", "Process")])))
    assert gene_term_sets(table, ontology=terms, propagate=True) == {
        1: frozenset({"GO:0000002", "GO:0000001", "GO:0000003"})
    }


def _write(path, text):
    path.write_text(text)
    return path


def test_knowledge_file_prefers_config_root_then_env(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    write_knowledge(a, GENES, [])
    write_knowledge(b, GENES, [], gz=False)
    monkeypatch.setenv("PERTURB_KNOWLEDGE", str(b))
    assert knowledge_file("gene_info", root=a) == a / "Homo_sapiens.gene_info.gz"
    assert knowledge_file("gene_info") == b / "Homo_sapiens.gene_info"
    assert knowledge_file("go_obo") == b / "go-basic.obo"


def test_missing_files_are_downloaded_from_the_public_url_base(tmp_path, monkeypatch, http_folder, isolated_cache):
    served, url = http_folder
    write_knowledge(served, GENES, [(1, "GO:0000002", "IDA", "Process")])
    (served / "go-basic.obo").write_text(OBO_TEXT)  # the public OBO is not compressed
    cache = isolated_cache
    monkeypatch.delenv("PERTURB_KNOWLEDGE", raising=False)
    monkeypatch.setenv("PERTURB_KNOWLEDGE_URL", url)
    path = knowledge_file("gene_info")
    assert path == cache / "knowledge" / "Homo_sapiens.gene_info.gz"
    assert list(read_gene_info(path)["symbol"]) == [g[1] for g in GENES]
    assert read_obo(knowledge_file("go_obo"))["GO:0000002"].name == "child process"
    assert len(read_gene2go(knowledge_file("gene2go"))) == 1
    # Second call finds the cached copy without the server.
    monkeypatch.setenv("PERTURB_KNOWLEDGE_URL", "http://127.0.0.1:9")
    assert knowledge_file("gene_info") == path


def test_offline_download_failure_names_where_files_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("PERTURB_KNOWLEDGE_URL", "http://127.0.0.1:9")
    with pytest.raises(KnowledgeFileError, match=r"(?s)looked for .*gene2go.gz.*PERTURB_KNOWLEDGE"):
        knowledge_file("gene2go", root=tmp_path / "empty")
    with pytest.raises(KnowledgeFileError, match="downloads are off"):
        knowledge_file("gene2go", root=tmp_path / "empty", allow_download=False)


@pytest.mark.real_data
def test_real_knowledge_files_cover_most_k562_genes(knowledge_root, perturbqa_root, capsys):
    assert (
        knowledge_cli(
            [
                "coverage",
                "--data",
                "k562",
                "--root",
                str(knowledge_root),
                "--data-root",
                str(perturbqa_root),
                "--no-download",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    found, total = map(int, out.split("found")[0].split(":")[-1].strip().split("/"))
    # Every K562 symbol resolves: MT- genes without their hyphen (MT-CO1 is COX1), SARS / TAZ /
    # HIST1H2BC through the dataset's own Ensembl ids.
    assert total > 4000 and found == total, out
    assert "through a synonym" in out and "GO annotations" in out
    terms = read_obo(knowledge_file("go_obo", knowledge_root, allow_download=False))
    assert terms["GO:0006915"].name == "apoptotic process"


def test_knowledge_library_never_imports_the_data_package():
    """Dataset facts reach knowledge code through the DataContext; only command-line mains join the two."""
    import ast

    from tests.conftest import REPO

    for path in sorted((REPO / "perturb_models" / "knowledge").glob("*.py")):
        if path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text())
        mains = {
            id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "main" for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in mains:
                assert not (node.module or "").startswith("perturb_models.data"), f"{path.name} imports {node.module}"
