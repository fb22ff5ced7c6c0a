"""ifcl: a reproducibility pipeline for parameter-efficient continual learning (InfLoRA, DIKI)."""

__version__ = "0.1.0"
