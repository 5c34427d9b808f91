"""sfam-pipeline: batch audits of what a metric-learning model finds similar in image pairs."""

from pipeline.explain import SFAM, ExplanationError, SFAMResult

__all__ = ["SFAM", "SFAMResult", "ExplanationError"]
