"""The built-in demo: cluttered digit canvases and a small trained embedding model."""

from pipeline.demo.canvas import Canvas, digit_indices, make_canvas, make_dataset
from pipeline.demo.model import EMBEDDING_LAYER, INPUT_SIZE, MEAN, STD, TARGET_LAYER, DemoEmbeddingNet, demo_model

__all__ = [
    "Canvas",
    "DemoEmbeddingNet",
    "EMBEDDING_LAYER",
    "INPUT_SIZE",
    "MEAN",
    "STD",
    "TARGET_LAYER",
    "demo_model",
    "digit_indices",
    "make_canvas",
    "make_dataset",
]
