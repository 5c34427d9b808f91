"""One pair explained in-process, from image URIs to an overlay PNG (what `sfam explain` does)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.explain import SFAM
from pipeline.explain.sfam import Weighting
from pipeline.io.images import decode_image, display_image, resize_for_model, to_model_tensor
from pipeline.io.storage import StorageOptions, read_bytes, write_bytes
from pipeline.models.loading import build_model
from pipeline.models.spec import ModelSpec
from pipeline.render import render_pair_png

MAX_PIXELS = 50_000_000
DISPLAY_SIDE = 512
TOP_CHANNELS = 10


@dataclass(frozen=True)
class PairExplanation:
    similarity: float
    top_channels: list[tuple[int, float, float]]  # (channel, CIS of query, CIS of reference)
    residual_query: float
    residual_reference: float
    png: bytes


def explain_pair(query_uri: str, reference_uri: str, spec: ModelSpec, options: StorageOptions,
                 weighting: Weighting = "cis", output: str | None = None) -> PairExplanation:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(spec, options).to(device)
    images = [decode_image(read_bytes(uri, options), uri, MAX_PIXELS) for uri in (query_uri, reference_uri)]
    pixels = np.stack([resize_for_model(rgb, spec.input_size) for rgb in images])
    x = to_model_tensor(pixels, spec.mean, spec.std, device)  # (2, 3, S, S)
    explainer = SFAM(model, spec.target_layer, spec.metric, embedding_layer=spec.embedding_layer, weighting=weighting)
    with torch.inference_mode():
        result = explainer.explain(x[:1], x[1:])
    cis_query, cis_reference = result.cis_query[0].cpu(), result.cis_reference[0].cpu()
    top = result.top_channels(TOP_CHANNELS)[0].tolist()
    similarity = float(result.similarity[0])
    png = render_pair_png(
        display_image(images[0], DISPLAY_SIDE), display_image(images[1], DISPLAY_SIDE),
        result.map_query[0].cpu().numpy(), result.map_reference[0].cpu().numpy(),
        similarity=similarity, metric=spec.metric, title=f"{spec.model_id} · {explainer.target_layer} · {weighting}",
        top_channels=top,
    )
    if output is not None:
        write_bytes(output, png, options)
    return PairExplanation(
        similarity=similarity,
        top_channels=[(c, float(cis_query[c]), float(cis_reference[c])) for c in top],
        residual_query=float(result.residual_query[0]),
        residual_reference=float(result.residual_reference[0]),
        png=png,
    )
