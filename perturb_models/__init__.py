"""perturb_models: train and compare models for the PerturbQA benchmark."""

from omegaconf import OmegaConf

from perturb_models.tasks import primary_metric

__version__ = "0.1.0"

if not OmegaConf.has_resolver("pm_primary_metric"):
    OmegaConf.register_new_resolver("pm_primary_metric", primary_metric)
