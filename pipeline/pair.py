"""One pair explained in-process, from two images' bytes to an overlay PNG (what `sfam explain` does)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.explain import SFAMResult
from pipeline.io.images import Pictures, decode_pictures
from pipeline.io.storage import StorageOptions
from pipeline.localisation import has_positive_evidence
from pipeline.models.explainer import build_explainer
from pipeline.models.spec import ModelSpec
from pipeline.render import render_pair_png
from pipeline.render.result_row import matches_in_pixels
from pipeline.schema import SIDES, TOP_CHANNELS

EXPLAIN_DISPLAY_SIDE = 512  # `sfam explain` draws one pair larger than the job's overlays (render.result_row.DISPLAY_SIDE)


@dataclass(frozen=True)
class PairExplanation:
    similarity: float
    target_layer: str
    top_channels: list[tuple[int, float, float]]  # (channel, CIS of query, CIS of reference)
    residual_query: float
    residual_reference: float
    png: bytes
    empty_maps: tuple[str, ...]  # the sides ("query", "reference") whose map has no positive evidence
    map_shape: tuple[int, int]  # (h, w) of both maps


def _correspondences_on_display(result: SFAMResult, pictures: list[Pictures]) -> list[tuple[list[float], list[float]]]:
    """The pair's correspondences (weighting "matched" only) as point pairs on the display pictures."""
    if result.correspondences is None:
        return []
    sizes = [(p.display.shape[1], p.display.shape[0]) for p in pictures]
    (matches,) = matches_in_pixels(result.correspondences[:1].cpu().numpy(), tuple(result.map_query.shape[1:]),
                                   sizes[:1], sizes[1:])
    return [(match["query_xy"], match["reference_xy"]) for match in matches]


def explain_pair(query: tuple[str, bytes], reference: tuple[str, bytes], spec: ModelSpec, options: StorageOptions,
                 max_image_pixels: int) -> PairExplanation:
    """Explains (query, reference), each (URI, bytes), with the spec's model, overlay PNG included.
    The images are decoded first: a wrong one is named before the model loads."""
    pictures = [decode_pictures(data, uri, max_image_pixels, spec.input_size, EXPLAIN_DISPLAY_SIDE)
                for uri, data in (query, reference)]
    explainer = build_explainer(spec, options)
    result = explainer.explain_pairs(np.stack([p.model_input for p in pictures]), [0], [1])  # (2, H, W, 3) in
    cis_query, cis_reference = result.cis_query[0].cpu(), result.cis_reference[0].cpu()
    top = result.top_channels(TOP_CHANNELS)[0].tolist()
    similarity = float(result.similarity[0])
    maps = result.map_query[0].cpu().numpy(), result.map_reference[0].cpu().numpy()  # (h, w) each
    png = render_pair_png(
        pictures[0].display, pictures[1].display, *maps,
        similarity=similarity, metric=spec.metric,
        title=f"{spec.model_id} · {explainer.target_layer} · {spec.weighting} map", top_channels=top,
        correspondences=_correspondences_on_display(result, pictures),
    )
    return PairExplanation(
        similarity=similarity,
        target_layer=str(explainer.target_layer),
        top_channels=[(c, float(cis_query[c]), float(cis_reference[c])) for c in top],
        residual_query=float(result.residual_query[0]),
        residual_reference=float(result.residual_reference[0]),
        png=png,
        empty_maps=tuple(side for side, saliency in zip(SIDES, maps) if not has_positive_evidence(saliency)),
        map_shape=maps[0].shape,
    )
