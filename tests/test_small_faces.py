"""Small photos (thumbnails, legacy 64x64 crops) keep their faces, and a one-person photo keeps its best candidate.

The photos are the shared LFW View 1 ones, downscaled here (never stored): ``bench/small_faces.py`` gives the
figures over all 4,992 of them; this checks a fixed slice.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from facenet_pytorch import MTCNN
from PIL import Image

from serve_app.model.detector import DetectorConfig, FaceDetector, main_face_index
from serve_app.model.enrollment import embed_for_enrolment
from serve_app.model.gallery import Gallery
from serve_app.model.images import DecodedImage, decode_image
from serve_app.model.pipeline import Models
from serve_app.model.recognizer import Recognizer, embed_main_faces
from serve_app.results import image_result_to_dict

from .conftest import LFW, SCENES


def thumbnail(data: bytes, side: int) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def lfw_slice(count: int) -> list[bytes]:
    paths = sorted((LFW / "images").glob("*/*.jpg"))
    return [p.read_bytes() for p in paths[:: len(paths) // count][:count]]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("side", [64, 96])
def test_every_thumbnail_keeps_its_face(models: Models, side: int) -> None:
    images = [decode_image(thumbnail(data, side)) for data in lfw_slice(160)]
    found = [d for batch in range(0, len(images), 32) for d in models.detector.detect_all(images[batch : batch + 32])]
    confident = sum(bool(d.faces) for d in found)
    with_candidate = sum(d.subject() is not None for d in found)
    boxes, _ = MTCNN().detect([Image.fromarray(image.pixels) for image in images])
    facenet_default = sum(b is not None and len(b) > 0 for b in boxes)
    assert with_candidate == len(images), f"{len(images) - with_candidate} thumbnails lost their face"
    assert with_candidate >= facenet_default
    # Upscaling is what finds them at the service's probability threshold, not the weak-candidate fallback.
    assert confident >= 0.98 * len(images)


def test_boxes_found_on_the_upscaled_copy_are_in_the_photos_own_pixels(models: Models) -> None:
    data = lfw_slice(10)[3]
    full = decode_image(data)
    small = decode_image(thumbnail(data, 64))
    (big_face,) = [f for f in models.detector.detect([full])[0] if f.width > 60]
    small_faces = models.detector.detect([small])[0]
    main = small_faces[main_face_index(small_faces, 64, 64) or 0]
    scaled = tuple(v * 64 / 250 for v in big_face.box)
    assert all(0 <= v <= 64 for v in main.box)
    assert iou(main.box, scaled) > 0.6
    assert all(0 <= x <= 64 and 0 <= y <= 64 for x, y in main.landmarks)


def test_ordinary_photos_are_not_upscaled_and_group_photos_gain_no_false_faces(models: Models) -> None:
    before = FaceDetector(replace(models.detector.config, small_photo_side=0))
    for name in ("selfie-many-people.jpg", "couple.jpg", "knn/test/obama_and_biden.jpg"):
        image = decode_image((SCENES / name).read_bytes())
        assert min(image.width, image.height) >= models.detector.config.small_photo_side
        assert len(models.detector.detect([image])[0]) == len(before.detect([image])[0]), name


def test_a_small_face_below_the_default_minimum_is_searched_for_in_a_small_photo(models: Models) -> None:
    small = DecodedImage(np.zeros((64, 64, 3), np.uint8), "test")
    large = DecodedImage(np.zeros((480, 640, 3), np.uint8), "test")
    assert models.detector.min_face_size(small) < DetectorConfig().min_face_size
    assert models.detector.min_face_size(large) == DetectorConfig().min_face_size


@pytest.fixture(scope="module")
def strict(models: Models) -> FaceDetector:
    """The shipped detector with a probability threshold no face reaches: every face becomes a weak candidate."""
    return FaceDetector(replace(models.detector.config, probability_threshold=1.01))


def test_a_one_person_photo_falls_back_to_its_best_candidate(models: Models, strict: FaceDetector) -> None:
    photos = sorted((SCENES / "knn" / "train" / "obama").iterdir())
    probe = decode_image((SCENES / "knn" / "test" / "obama1.jpg").read_bytes())
    # The list of faces keeps the threshold; the photo's single answer does not lose its person.
    assert strict.detect([probe]) == [[]]
    assert strict.detect_all([probe])[0].subject() is not None

    outcomes = embed_for_enrolment(strict, models.embedder, [(p.name, p.read_bytes()) for p in photos])
    assert all(o.refused is None for o in outcomes), [o.refused for o in outcomes]
    gallery = Gallery(models.embedder.model_id, models.embedder.dim)
    gallery.add("obama", np.stack([o.embedding for o in outcomes if o.embedding is not None]), gallery.model_id)

    result = Recognizer(strict, models.embedder, gallery, threshold=models.threshold).recognize([probe])[0]
    assert result.faces == () and result.main_face is None
    assert result.best_guess is not None and result.main_name == "obama"
    answer = image_result_to_dict(result)
    assert answer["name"] == "obama" and answer["faces"] == [] and answer["best_guess"]["name"] == "obama"

    (vector,) = embed_main_faces(strict, models.embedder, [probe])
    assert vector is not None
    confident = embed_main_faces(models.detector, models.embedder, [probe])[0]
    assert confident is not None and float(np.dot(vector, confident)) > 0.99  # the same face either way


def test_a_photo_with_no_candidate_at_all_has_no_answer(models: Models, strict: FaceDetector) -> None:
    blank = DecodedImage(np.full((200, 200, 3), 127, np.uint8), "test")
    found = strict.detect_all([blank])[0]
    assert found.faces == () and found.subject() is None
    assert embed_main_faces(strict, models.embedder, [blank]) == [None]
