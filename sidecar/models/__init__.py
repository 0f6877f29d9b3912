"""Model workers: load a declared model and score batches off the event loop, with a timeout."""

from .base import BatchScores, Predictor, ScoringModel
from .loaders import load_model

__all__ = ["BatchScores", "Predictor", "ScoringModel", "load_model"]
