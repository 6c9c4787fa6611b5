"""perturb_models: train and compare models for the PerturbQA benchmark."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def primary_metric(task: str) -> str:
    """The validation metric a run selects on by default: DE per-gene AUROC, direction's for task=dir,
    ROUGE-1 recall on held-out GO terms for gene set enrichment (task=gse)."""
    if task == "gse":
        return "val/rouge1_recall"
    return "val/dir_auroc_per_gene" if task == "dir" else "val/de_auroc_per_gene"


if not OmegaConf.has_resolver("pm_primary_metric"):
    OmegaConf.register_new_resolver("pm_primary_metric", primary_metric)
