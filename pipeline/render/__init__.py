"""What a person looks at: PNG overlays of a pair and the HTML report of a run.

Pure functions from arrays / rows to bytes / str; callers write the results.
"""

from pipeline.render.overlay import heatmap_overlay, render_pair_png
from pipeline.render.report_html import render_report, safe_href

__all__ = ["heatmap_overlay", "render_pair_png", "render_report", "safe_href"]
