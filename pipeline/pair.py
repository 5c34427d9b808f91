"""One pair explained in-process, from image URIs to an overlay PNG (what `sfam explain` does)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.io.images import decode_image, display_image, resize_for_model
from pipeline.io.storage import StorageOptions, read_bytes, write_bytes
from pipeline.models.explainer import build_explainer
from pipeline.models.spec import ModelSpec
from pipeline.render import render_pair_png
from pipeline.schema import TOP_CHANNELS

DISPLAY_SIDE = 512


@dataclass(frozen=True)
class PairExplanation:
    similarity: float
    target_layer: str
    top_channels: list[tuple[int, float, float]]  # (channel, CIS of query, CIS of reference)
    residual_query: float
    residual_reference: float
    png: bytes


def explain_pair(query_uri: str, reference_uri: str, spec: ModelSpec, options: StorageOptions,
                 max_image_pixels: int, output: str | None = None) -> PairExplanation:
    """Explains (query, reference) with the spec's model; writes the overlay to `output` if given."""
    explainer = build_explainer(spec, options)
    images = [decode_image(read_bytes(uri, options), uri, max_image_pixels) for uri in (query_uri, reference_uri)]
    pixels = np.stack([resize_for_model(rgb, spec.input_size) for rgb in images])  # (2, S, S, 3)
    result = explainer.explain_pairs(pixels, [0], [1])
    cis_query, cis_reference = result.cis_query[0].cpu(), result.cis_reference[0].cpu()
    top = result.top_channels(TOP_CHANNELS)[0].tolist()
    similarity = float(result.similarity[0])
    png = render_pair_png(
        display_image(images[0], DISPLAY_SIDE), display_image(images[1], DISPLAY_SIDE),
        result.map_query[0].cpu().numpy(), result.map_reference[0].cpu().numpy(),
        similarity=similarity, metric=spec.metric,
        title=f"{spec.model_id} · {explainer.target_layer} · {spec.weighting}", top_channels=top,
    )
    if output is not None:
        write_bytes(output, png, options)
    return PairExplanation(
        similarity=similarity,
        target_layer=str(explainer.target_layer),
        top_channels=[(c, float(cis_query[c]), float(cis_reference[c])) for c in top],
        residual_query=float(result.residual_query[0]),
        residual_reference=float(result.residual_reference[0]),
        png=png,
    )
