"""Small hand-written knowledge files in the real formats, shared by the knowledge and graph tests."""

from __future__ import annotations

import gzip
from pathlib import Path

GENE_INFO_HEADER = (
    "#tax_id\tGeneID\tSymbol\tLocusTag\tSynonyms\tdbXrefs\tchromosome\tmap_location\tdescription\t"
    "type_of_gene\tSymbol_from_nomenclature_authority\tFull_name_from_nomenclature_authority\t"
    "Nomenclature_status\tOther_designations\tModification_date\tFeature_type"
)


def gene_info_text(genes: list[tuple[int, str, str, str]]) -> str:
    """genes: (GeneID, Symbol, Synonyms joined by |, description)."""
    lines = [GENE_INFO_HEADER]
    for gid, sym, syn, desc in genes:
        lines.append(
            f"9606\t{gid}\t{sym}\t-\t{syn or '-'}\tEnsembl:ENSG{gid:011d}\t1\t1p1\t{desc}\t"
            "protein-coding\t-\t-\t-\t-\t20220912\t-"
        )
    return "\n".join(lines) + "\n"


def gene2go_text(rows: list[tuple[int, str, str, str]], qualifier: dict | None = None) -> str:
    """rows: (GeneID, GO id, evidence, Category)."""
    lines = ["#tax_id\tGeneID\tGO_ID\tEvidence\tQualifier\tGO_term\tPubMed\tCategory"]
    for gid, go, ev, cat in rows:
        q = (qualifier or {}).get((gid, go), "-")
        lines.append(f"9606\t{gid}\t{go}\t{ev}\t{q}\tterm\t-\t{cat}")
    lines.append("10090\t999\tGO:0000010\tIDA\t-\tmouse\t-\tProcess")  # another species, filtered out
    return "\n".join(lines) + "\n"


OBO_TEXT = """format-version: 1.2
ontology: go

[Term]
id: GO:0008150
name: biological_process
namespace: biological_process
def: "A biological process." []

[Term]
id: GO:0000001
name: parent process
namespace: biological_process
def: "The parent." []
is_a: GO:0008150 ! biological_process

[Term]
id: GO:0000002
name: child process
namespace: biological_process
alt_id: GO:0000099
def: "A child of the parent, with a \\"quote\\"." []
is_a: GO:0000001 ! parent process
relationship: part_of GO:0000003 ! whole process

[Term]
id: GO:0000003
name: whole process
namespace: biological_process
def: "The whole." []
is_a: GO:0008150 ! biological_process

[Term]
id: GO:0000004
name: regulation of child
namespace: biological_process
def: "Regulates the child." []
is_a: GO:0008150 ! biological_process
relationship: regulates GO:0000002 ! child process

[Term]
id: GO:0000005
name: a function
namespace: molecular_function
def: "Some function." []

[Term]
id: GO:0000006
name: another function
namespace: molecular_function
def: "Another function." []

[Term]
id: GO:0000007
name: a place
namespace: cellular_component
def: "A component." []

[Typedef]
id: part_of
name: part of
"""


def write_knowledge(folder: Path, genes, annotations, qualifier=None, gz: bool = True) -> Path:
    """Write gene_info, gene2go and go-basic.obo into ``folder`` (gzip like the public files)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "Homo_sapiens.gene_info": gene_info_text(genes),
        "gene2go": gene2go_text(annotations, qualifier),
        "go-basic.obo": OBO_TEXT,
    }
    for name, text in files.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wt") as handle:
                handle.write(text)
        else:
            (folder / name).write_text(text)
    return folder
