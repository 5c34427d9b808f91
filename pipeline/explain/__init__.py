"""SFAM math: torch only (no Ray, fsspec, pydantic or files), so it can be lifted anywhere."""

from pipeline.explain.layers import ExplanationError
from pipeline.explain.sfam import SFAM, SFAMResult

__all__ = ["SFAM", "SFAMResult", "ExplanationError"]
