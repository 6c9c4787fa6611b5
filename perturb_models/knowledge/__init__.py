"""Gene knowledge: readers for NCBI gene_info / gene2go, GO GAF and OBO files, and gene networks built on them."""

from perturb_models.knowledge.files import KNOWLEDGE_FILES, KnowledgeFileError, knowledge_file, knowledge_root
from perturb_models.knowledge.gene_info import CoverageReport, SymbolResolver, read_gene_info
from perturb_models.knowledge.go import GODag, GOTerm, gene_term_sets, read_gaf, read_gene2go, read_obo

__all__ = [
    "KNOWLEDGE_FILES",
    "KnowledgeFileError",
    "knowledge_file",
    "knowledge_root",
    "CoverageReport",
    "SymbolResolver",
    "read_gene_info",
    "GODag",
    "GOTerm",
    "gene_term_sets",
    "read_gaf",
    "read_gene2go",
    "read_obo",
]
