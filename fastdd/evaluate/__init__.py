"""Evaluation protocol: train fresh models on a synthetic set and report real test accuracy."""
from .protocol import DSA_STRATEGY, evaluate_synthetic, predict, summarise, train_and_evaluate

__all__ = ["train_and_evaluate", "evaluate_synthetic", "predict", "summarise", "DSA_STRATEGY"]
