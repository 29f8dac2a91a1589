"""MTCNN on real photos: multi-face scenes, no false faces on blank or noise, boxes in original pixels."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.model.detector import DetectedFace, DetectorConfig, FaceDetector, main_face_index
from serve_app.model.images import DecodedImage, decode_image

from .conftest import LFW, SCENES


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def load(path: str) -> DecodedImage:
    return decode_image((SCENES / path).read_bytes())


def test_two_faces_side_by_side(detector: FaceDetector) -> None:
    image = load("knn/test/obama_and_biden.jpg")
    faces = detector.detect([image])[0]
    # Obama and Biden, and a child lower right (a real third face, smaller).
    assert len(faces) >= 2
    big = sorted(faces, key=lambda f: f.width * f.height, reverse=True)[:2]
    assert all(f.probability >= 0.99 for f in big)
    centres = sorted((f.box[0] + f.box[2]) / 2 for f in big)
    assert centres[0] < image.width / 2 < centres[1]


def test_many_faces_in_a_group_selfie(detector: FaceDetector) -> None:
    faces = detector.detect([load("selfie-many-people.jpg")])[0]
    assert len(faces) >= 4
    assert all(f.probability >= DetectorConfig().probability_threshold for f in faces)


def test_couple_has_two_faces(detector: FaceDetector) -> None:
    assert len(detector.detect([load("couple.jpg")])[0]) == 2


@pytest.mark.parametrize(
    "pixels",
    [
        np.full((300, 400, 3), 255, np.uint8),
        np.zeros((240, 240, 3), np.uint8),
        np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8),
    ],
    ids=["white", "black", "noise"],
)
def test_no_face_in_blank_or_noise(detector: FaceDetector, pixels: np.ndarray) -> None:
    assert detector.detect([DecodedImage(pixels, "test")]) == [[]]


def test_tiny_image_does_not_crash(detector: FaceDetector) -> None:
    assert detector.detect([DecodedImage(np.zeros((5, 7, 3), np.uint8), "test")]) == [[]]


def test_downscaled_detection_maps_boxes_back(detector: FaceDetector) -> None:
    image = load("knn/test/obama1.jpg")
    full = detector.detect([image])[0]
    small = FaceDetector(DetectorConfig(max_side=max(image.width, image.height) // 2)).detect([image])[0]
    assert len(full) == len(small) == 1
    # Same face, same place in original pixels (within a few percent of the face size).
    assert np.allclose(full[0].box, small[0].box, atol=0.08 * full[0].width)
    assert np.allclose(full[0].landmarks, small[0].landmarks, atol=0.08 * full[0].width)


def test_batch_equals_one_by_one(detector: FaceDetector) -> None:
    paths = sorted((LFW / "images").glob("Ab*/*.jpg"))[:6]
    images = [decode_image(p.read_bytes()) for p in paths] + [load("knn/test/kit_with_rose.jpg")]
    batched = detector.detect(images)
    single = [detector.detect([image])[0] for image in images]
    for one, other in zip(batched, single, strict=True):
        assert len(one) == len(other)
        for a, b in zip(one, other, strict=True):
            assert np.allclose(a.box, b.box, atol=1.0) and abs(a.probability - b.probability) < 1e-3


def test_landmarks_lie_inside_their_box(detector: FaceDetector) -> None:
    for face in detector.detect([load("knn/test/kit_with_rose.jpg")])[0]:
        x1, y1, x2, y2 = face.box
        assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face.landmarks)
        (lx, _ly), (rx, _ry) = face.landmarks[:2]
        assert lx < rx  # left eye is left of the right eye as seen


def test_crops_have_the_embedder_shape(detector: FaceDetector) -> None:
    image = load("knn/test/kit_with_rose.jpg")
    crops = detector.crops(image, detector.detect([image])[0])
    assert crops.shape == (2, 3, 160, 160)
    assert float(crops.min()) >= 0.0 and float(crops.max()) <= 255.0


def face(box: tuple[float, float, float, float]) -> DetectedFace:
    return DetectedFace(box=box, probability=0.99, landmarks=((0.0, 0.0),) * 5)


def test_main_face_prefers_the_centre_over_the_largest() -> None:
    # 250x250 like LFW: a centred face and a larger one at the edge (a background face cut by the frame).
    centred = face((90, 80, 160, 170))
    edge = face((170, 0, 250, 100))
    assert main_face_index([edge, centred], 250, 250) == 1
    assert main_face_index([], 250, 250) is None
    assert main_face_index([edge], 250, 250) == 0


def test_main_face_of_a_real_lfw_photo_with_a_background_face(detector: FaceDetector) -> None:
    # Find LFW photos with two faces: the chosen one is the one nearest the centre.
    checked = 0
    for path in sorted((LFW / "images").glob("A*/*.jpg"))[:300]:
        image = decode_image(path.read_bytes())
        faces = detector.detect([image])[0]
        if len(faces) < 2:
            continue
        chosen = faces[main_face_index(faces, image.width, image.height) or 0]
        cx = (chosen.box[0] + chosen.box[2]) / 2
        cy = (chosen.box[1] + chosen.box[3]) / 2
        assert abs(cx - 125) < 40 and abs(cy - 125) < 40, path.name
        checked += 1
    assert checked >= 1


def test_a_cuda_detector_runs_its_convolutions_without_tf32() -> None:
    """TF32 moved an MTCNN box by 4.7 px on a GPU (bench/results/gpu/gpu_agreement.json): CUDA runs in float32."""
    import torch

    from serve_app.model.detector import exact_convolutions_on

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        exact_convolutions_on(torch.device("cpu"))  # the CPU has no TF32: nothing changes
        assert torch.backends.cudnn.allow_tf32
        exact_convolutions_on(torch.device("cuda"))
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
