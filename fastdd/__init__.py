"""fastdd: custom-kernel performance engine for dataset distillation."""
__version__ = "0.1.0"
