import numpy as np
import pytest

from pipeline.demo.canvas import Canvas, digit_indices, make_canvas, make_dataset


def _check_digit(canvas: Canvas, i: int, size: int) -> None:
    x0, y0, x1, y1 = canvas.boxes[i]
    assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
    mask = canvas.masks[i]
    assert mask.shape == (size, size) and mask.any()
    ys, xs = np.nonzero(mask)
    # the box is tight around the strokes
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
    # the strokes stand out from the pixels around the box
    img = canvas.image.astype(float)
    ring = np.zeros((size, size), bool)
    ring[max(0, int(y0) - 4) : int(y1) + 4, max(0, int(x0) - 4) : int(x1) + 4] = True
    ring[int(y0) : int(y1), int(x0) : int(x1)] = False
    if ring.sum() > 20:
        assert np.abs(img[mask].mean(0) - img[ring].mean(0)).sum() > 60


def test_splits_are_disjoint_and_cover_all_digits():
    train, test = digit_indices("train"), digit_indices("test")
    assert not set(train) & set(test)
    assert len(train) + len(test) == 1797
    assert (test % 5 == 0).all()
    with pytest.raises(ValueError):
        digit_indices("val")


def test_same_seed_same_canvas_and_different_seed_differs():
    a = make_canvas(np.random.default_rng(7), [3], "test")
    b = make_canvas(np.random.default_rng(7), [3], "test")
    c = make_canvas(np.random.default_rng(8), [3], "test")
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("size", [64, 96])
def test_single_digit_canvases(size):
    rng = np.random.default_rng(0)
    for i in range(40):
        canvas = make_canvas(rng, [i % 10], "train", size)
        assert canvas.image.dtype == np.uint8 and canvas.image.shape == (size, size, 3)
        assert canvas.labels == [i % 10] and len(canvas.boxes) == 1
        _check_digit(canvas, 0, size)
        side = max(canvas.boxes[0][2] - canvas.boxes[0][0], canvas.boxes[0][3] - canvas.boxes[0][1])
        assert 0.2 * size <= side <= 0.65 * size


def test_two_digit_canvases_have_disjoint_boxes_and_the_given_classes():
    rng = np.random.default_rng(1)
    for i in range(200):  # many layouts, including the tallest digits
        classes = [i % 10, (i * 7 + 3) % 10]
        canvas = make_canvas(rng, classes, "test")
        assert canvas.labels == classes
        for k in range(2):
            _check_digit(canvas, k, 64)
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = canvas.boxes
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
        assert not (canvas.masks[0] & canvas.masks[1]).any()


def test_invalid_classes_are_rejected():
    rng = np.random.default_rng(0)
    for classes in ([], [1, 2, 3], [10]):
        with pytest.raises(ValueError):
            make_canvas(rng, classes)


def test_make_dataset_shapes_and_given_classes():
    images, labels, boxes = make_dataset(np.random.default_rng(2), 12, "train", 64, classes=[5] * 12)
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == [5] * 12 and labels.dtype == np.int64
    assert boxes.shape == (12, 4) and boxes.dtype == np.float32
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    _, labels, _ = make_dataset(np.random.default_rng(3), 500)
    assert set(labels.tolist()) == set(range(10))
