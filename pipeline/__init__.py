"""sfam-pipeline: batch audits of what a metric-learning model finds similar in image pairs.

The explainer's names load torch when first used, not on `import pipeline`: the command line
installs its Ctrl-C and SIGTERM handling before the seconds that import takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.explain import SFAM, ExplanationError, SFAMResult

__all__ = ["SFAM", "SFAMResult", "ExplanationError"]


def __getattr__(name: str) -> object:
    if name in __all__:
        import pipeline.explain

        return getattr(pipeline.explain, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
