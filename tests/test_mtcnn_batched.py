"""The batched MTCNN (serve_app.model.mtcnn_batched) finds the faces that facenet-pytorch's detect_face finds.

Real photos: LFW at 250x250 and downscaled to 64x64, and the multi-face photos of scenes/. Plus the pieces that
make it exact: the summed-area crops equal facenet-pytorch's area resizes, and PNet on a canvas of pyramid levels
equals PNet on each level.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from facenet_pytorch import MTCNN
from facenet_pytorch.models.utils.detect_face import detect_face, imresample
from PIL import Image
from torch import nn

from serve_app.model.mtcnn_batched import (
    PIXEL_MEAN,
    PIXEL_SCALE,
    PyramidLayout,
    PyramidMode,
    _crop_and_resize,
    _proposals,
    _summed_area_table,
    detect_faces,
)

DATASETS = Path(os.environ.get("FACEREC_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))

#: facenet-pytorch's MTCNN defaults, which the service uses (DetectorConfig).
MIN_FACE_SIZE = 20.0
THRESHOLDS = [0.6, 0.7, 0.7]
FACTOR = 0.709
CPU = torch.device("cpu")
#: LFW photos compared at each size, in batches like the service's (equal-size photos share a batch).
LFW_PHOTOS = 100
LFW_BATCH = 20
#: DetectorConfig.max_side: the service detects on photos downscaled to this longest side.
MAX_SIDE = 1280

# Tolerances. With torchvision's roi_align for the crops (bilinear samples, not area averages) probabilities moved
# by up to 0.17 and 2 of 64 photos at 64x64 changed their count of faces >= 0.9, so it was not used. The crops and
# pyramid levels here come from a summed-area table, which reproduces facenet-pytorch's area resizes exactly up to
# float rounding, and PNet on a canvas computes the same convolutions: on these photos boxes and landmarks agree
# to 1e-4 px and probabilities to 1e-7. The contract tolerances (IoU, probability, landmarks) still leave room for
# what rounding can change on another CPU, where oneDNN may pick other kernels: a candidate within ~1e-6 of a
# stage threshold or NMS overlap may go either way, and then the surviving box is a neighbour of the same face.
# EXACT_* checks that nearly every face agrees to rounding.
COUNT_PROBABILITY = 0.9
#: A face counted (p >= 0.9) on one side must exist with at least this probability on the other.
PROBABILITY_SLACK = 0.02
MIN_IOU = 0.9
MAX_PROBABILITY_DIFF = 0.02
MAX_LANDMARK_DIFF_PX = 2.0
EXACT_PX = 0.01
EXACT_PROBABILITY = 1e-4
EXACT_SHARE = 0.98


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread for this module: the answers do not depend on it, and on a shared 2-core machine two
    threads that spin-wait for each other made these comparisons 3-4x slower in wall time (25-40 s instead of
    7-9 s for the 100 LFW photos at load average 4-5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nets() -> tuple[nn.Module, nn.Module, nn.Module]:
    """MTCNN's PNet, RNet and ONet, set up as the service's detector sets them up."""
    mtcnn = MTCNN(device=CPU)  # loads the weights bundled in the wheel; downloads nothing
    mtcnn.eval()
    mtcnn.to(memory_format=torch.channels_last)  # as serve_app.model.detector.FaceDetector runs it
    return mtcnn.pnet, mtcnn.rnet, mtcnn.onet


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def lfw_photos() -> list[Image.Image]:
    paths = sorted((DATASETS / "lfw-view1" / "images").glob("*/*.jpg"))[:LFW_PHOTOS]
    if len(paths) < LFW_PHOTOS:
        pytest.fail(f"LFW photos are missing under {DATASETS}")
    return [_rgb(p) for p in paths]


def _scene_photos() -> Iterator[tuple[str, np.ndarray]]:
    """The group, partial-face and RGBA photos of scenes/ (the knn/ ones add size, not kinds of face)."""
    for path in sorted((DATASETS / "scenes").glob("*.*")):
        image = _rgb(path)
        longest = max(image.size)
        if longest > MAX_SIDE:  # as FaceDetector._detection_view does
            scale = MAX_SIDE / longest
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        yield path.name, np.array(image)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x1, y1, x2, y2, ...) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _faces(boxes: np.ndarray, points: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index``'s boxes ``(k, 5)`` and landmarks ``(k, 5, 2)`` as float32, also when k is 0."""
    image_boxes = np.asarray(boxes[index], dtype=np.float32).reshape(-1, 5)
    image_points = np.asarray(points[index], dtype=np.float32).reshape(-1, 5, 2)
    return image_boxes, image_points


def _assert_same_faces(batch: np.ndarray, nets: tuple[nn.Module, nn.Module, nn.Module], label: str) -> list[bool]:
    """Run both implementations on ``batch`` and compare face by face; for each face compared, whether the two
    agree to rounding (``EXACT_*``)."""
    tensor = torch.from_numpy(batch)
    with torch.inference_mode():
        ref_boxes, ref_points = detect_face(tensor, MIN_FACE_SIZE, *nets, THRESHOLDS, FACTOR, CPU)
        new_boxes, new_points = detect_faces(tensor, MIN_FACE_SIZE, *nets, THRESHOLDS, FACTOR, CPU)
    assert new_boxes.dtype == ref_boxes.dtype == object
    assert new_boxes.shape == ref_boxes.shape and new_points.shape == ref_points.shape
    exact: list[bool] = []
    for i in range(len(batch)):
        ref_b, ref_p = _faces(ref_boxes, ref_points, i)
        new_b, new_p = _faces(new_boxes, new_points, i)
        where = f"{label}[{i}]"
        for one, other, one_name in ((ref_b, new_b, "facenet"), (new_b, ref_b, "batched")):
            counted = one[one[:, 4] >= COUNT_PROBABILITY]
            near = other[other[:, 4] >= COUNT_PROBABILITY - PROBABILITY_SLACK]
            assert len(counted) <= len(near), f"{where}: {one_name} has faces the other lacks: {one} vs {other}"
        assert (ref_b[:, 4] >= COUNT_PROBABILITY).sum() == (new_b[:, 4] >= COUNT_PROBABILITY).sum(), where
        for box, marks in zip(ref_b, ref_p, strict=True):
            if box[4] < COUNT_PROBABILITY:
                continue
            ious = [_iou(box, other) for other in new_b]
            best = int(np.argmax(ious))
            assert ious[best] >= MIN_IOU, f"{where}: no match for {box}: {new_b}"
            assert abs(new_b[best, 4] - box[4]) <= MAX_PROBABILITY_DIFF, where
            assert np.abs(new_p[best] - marks).max() <= MAX_LANDMARK_DIFF_PX, where
            px = max(np.abs(new_b[best, :4] - box[:4]).max(), np.abs(new_p[best] - marks).max())
            exact.append(bool(px <= EXACT_PX and abs(new_b[best, 4] - box[4]) <= EXACT_PROBABILITY))
    return exact


@pytest.mark.parametrize("side", [250, 64])
def test_same_faces_as_facenet_on_lfw(
    nets: tuple[nn.Module, nn.Module, nn.Module], lfw_photos: list[Image.Image], side: int
) -> None:
    photos = [p if p.size == (side, side) else p.resize((side, side), Image.Resampling.BILINEAR) for p in lfw_photos]
    pixels = np.stack([np.asarray(p) for p in photos])
    exact: list[bool] = []
    for start in range(0, len(pixels), LFW_BATCH):  # batches also check that the images of a batch stay apart
        exact += _assert_same_faces(pixels[start : start + LFW_BATCH], nets, f"lfw{side}@{start}")
    assert len(exact) >= 0.95 * LFW_PHOTOS  # a face in nearly every LFW photo
    assert np.mean(exact) >= EXACT_SHARE


def test_same_faces_as_facenet_on_scenes(nets: tuple[nn.Module, nn.Module, nn.Module]) -> None:
    exact: list[bool] = []
    for name, pixels in _scene_photos():
        exact += _assert_same_faces(pixels[None], nets, name)
    assert np.mean(exact) >= EXACT_SHARE
    assert len(exact) >= 8  # the couple (2), the group selfie (several), the partial face, the RGBA portrait


def test_single_image_without_batch_axis(nets: tuple[nn.Module, nn.Module, nn.Module]) -> None:
    name, pixels = next(_scene_photos())
    with torch.inference_mode():
        single = detect_faces(torch.from_numpy(pixels), MIN_FACE_SIZE, *nets, THRESHOLDS, FACTOR, CPU)
        batched = detect_faces(torch.from_numpy(pixels[None]), MIN_FACE_SIZE, *nets, THRESHOLDS, FACTOR, CPU)
    assert np.array_equal(np.asarray(single[0][0], np.float32), np.asarray(batched[0][0], np.float32)), name


def test_float_pixels_give_the_same_faces(
    nets: tuple[nn.Module, nn.Module, nn.Module], lfw_photos: list[Image.Image]
) -> None:
    pixels = torch.from_numpy(np.stack([np.asarray(p) for p in lfw_photos[:2]]))
    as_uint8 = detect_faces(pixels, MIN_FACE_SIZE, *nets, THRESHOLDS, FACTOR, CPU)
    as_float = detect_faces(pixels.float(), MIN_FACE_SIZE, *nets, THRESHOLDS, FACTOR, CPU)
    for a, b in zip(as_uint8[0], as_float[0], strict=True):
        assert np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-3)


@pytest.mark.parametrize("shape", [(240, 240), (300, 400)])
def test_no_faces_gives_empty_arrays(nets: tuple[nn.Module, nn.Module, nn.Module], shape: tuple[int, int]) -> None:
    pixels = torch.full((2, *shape, 3), 128, dtype=torch.uint8)
    with torch.inference_mode():
        boxes, points = detect_faces(pixels, MIN_FACE_SIZE, *nets, THRESHOLDS, FACTOR, CPU)
    assert [np.asarray(b).reshape(-1, 5).shape for b in boxes] == [(0, 5), (0, 5)]
    assert [np.asarray(p).reshape(-1, 5, 2).shape for p in points] == [(0, 5, 2), (0, 5, 2)]


def test_image_smaller_than_min_face_has_no_faces(nets: tuple[nn.Module, nn.Module, nn.Module]) -> None:
    with torch.inference_mode():
        boxes, _ = detect_faces(torch.zeros((1, 15, 17, 3), dtype=torch.uint8), 20.0, *nets, THRESHOLDS, FACTOR, CPU)
    assert len(boxes) == 1 and np.asarray(boxes[0]).size == 0


@pytest.mark.parametrize(("height", "width"), [(250, 250), (64, 64), (891, 1280), (1137, 491), (37, 300)])
@pytest.mark.parametrize("mode", [PyramidMode.TILED, PyramidMode.AUTO])
def test_pyramid_tiles_are_disjoint_even_and_complete(height: int, width: int, mode: PyramidMode) -> None:
    layout = PyramidLayout.plan(height, width, MIN_FACE_SIZE, FACTOR, mode)
    placed = sorted(t.level for canvas in layout.canvases for t in canvas.tiles)
    assert placed == list(range(len(layout.scales)))
    for canvas in layout.canvases:
        used = np.zeros((canvas.height, canvas.width), dtype=np.int64)
        for t in canvas.tiles:
            assert (t.height, t.width) == layout.sizes[t.level]
            assert t.top % 2 == 0 and t.left % 2 == 0  # PNet's 2x2 pool must stay aligned with each level
            assert t.top + t.height <= canvas.height and t.left + t.width <= canvas.width
            used[t.top : t.top + t.height, t.left : t.left + t.width] += 1
        assert used.max() == 1


@pytest.mark.parametrize(("width", "height"), [(301, 187), (187, 301), (64, 64)])
@pytest.mark.parametrize("mode", [PyramidMode.TILED, PyramidMode.AUTO])
def test_pnet_on_a_canvas_equals_pnet_per_level(
    lfw_photos: list[Image.Image],
    nets: tuple[nn.Module, nn.Module, nn.Module],
    width: int,
    height: int,
    mode: PyramidMode,
) -> None:
    """Stage 1 alone, on odd landscape and portrait sizes (odd level sides exercise the masked pool windows)."""
    pixels = torch.from_numpy(
        np.stack([np.array(p.resize((width, height), Image.Resampling.BILINEAR)) for p in lfw_photos[:3]])
    )
    table = _summed_area_table(pixels)
    results = []
    with torch.inference_mode():
        for pyramid in (PyramidMode.PER_LEVEL, mode):
            layout = PyramidLayout.plan(height, width, MIN_FACE_SIZE, FACTOR, pyramid, len(pixels))
            boxes, image_inds = _proposals(table, layout, nets[0], THRESHOLDS[0], torch.float32)
            rows = torch.cat([image_inds.unsqueeze(1).float(), boxes], dim=1).numpy()
            results.append(rows[np.lexsort(rows[:, :5].T[::-1])])  # NMS output order breaks score ties freely
    assert len(results[0]) > 0
    assert results[0].shape == results[1].shape
    assert np.allclose(results[0], results[1], atol=1e-4)


def test_crops_equal_facenet_area_resizes() -> None:
    """Boxes inside, across every edge, larger than the image, and smaller than the output (upsampling)."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 61, 83, 3), dtype=np.uint8))
    boxes = torch.tensor(
        [
            [10.3, 5.7, 40.9, 36.2],
            [-12.5, -3.0, 20.0, 29.5],
            [70.0, 50.0, 101.0, 81.0],
            [-5.0, -5.0, 100.0, 100.0],
            [30.0, 30.0, 37.0, 37.0],
            [0.0, 0.0, 83.0, 61.0],
        ],
        dtype=torch.float32,
    )
    image_inds = torch.tensor([0, 1, 0, 1, 0, 1])
    table = _summed_area_table(images)
    nchw = images.permute(0, 3, 1, 2).float()
    for size in (24, 48):
        crops, nonempty = _crop_and_resize(table, image_inds, boxes, size, torch.float32)
        assert bool(nonempty.all())
        for k, box in enumerate(boxes.trunc().int().tolist()):  # facenet-pytorch's pad(): truncate, clip 1-based
            x, y = max(box[0], 1), max(box[1], 1)
            ex, ey = min(box[2], 83), min(box[3], 61)
            crop = nchw[int(image_inds[k]), :, y - 1 : ey, x - 1 : ex].unsqueeze(0)
            expected = (imresample(crop, (size, size)) - PIXEL_MEAN) * PIXEL_SCALE
            assert torch.allclose(crops[k : k + 1], expected, atol=1e-5), (size, k)


def test_crop_of_a_box_outside_the_image_is_flagged_empty() -> None:
    table = _summed_area_table(torch.zeros((1, 20, 20, 3), dtype=torch.uint8))
    boxes = torch.tensor([[25.0, 2.0, 40.0, 17.0], [2.0, 2.0, 17.0, 17.0]])
    _, nonempty = _crop_and_resize(table, torch.tensor([0, 0]), boxes, 24, torch.float32)
    assert nonempty.tolist() == [False, True]
