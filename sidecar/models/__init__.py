"""Model workers: load a declared model and score batches off the event loop, with a timeout."""

from .base import AsyncPredictor, BatchScores, ModelUnavailable, Predictor, ScoringModel
from .loaders import load_model

__all__ = [
    "AsyncPredictor",
    "BatchScores",
    "ModelUnavailable",
    "Predictor",
    "ScoringModel",
    "load_model",
]
