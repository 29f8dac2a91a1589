"""End to end in one process: enrol the knn training photos, then name every face of the test photos."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.model.enrollment import embed_for_enrolment
from serve_app.model.gallery import Gallery
from serve_app.model.images import InvalidImageError, decode_image
from serve_app.model.pipeline import Models
from serve_app.model.recognizer import ImageResult, Recognizer, embed_main_faces

from .conftest import KNN_EXPECTED, LFW, SCENES


@pytest.fixture(scope="module")
def recognizer(models: Models) -> Recognizer:
    gallery = Gallery(models.embedder.model_id, models.embedder.dim)
    for person in sorted((SCENES / "knn" / "train").iterdir()):
        photos = [(p.name, p.read_bytes()) for p in sorted(person.iterdir())]
        outcomes = embed_for_enrolment(models.detector, models.embedder, photos)
        vectors = [o.embedding for o in outcomes if o.embedding is not None]
        assert vectors, f"no usable photo for {person.name}: {[o.refused for o in outcomes]}"
        gallery.add(person.name, np.stack(vectors), models.embedder.model_id)
    return Recognizer(models.detector, models.embedder, gallery, threshold=models.threshold)


def known_faces_left_to_right(result: ImageResult) -> list[str | None]:
    # Faces the gallery does not know (the child behind Obama) are allowed; every enrolled face must be named.
    ordered = sorted(result.faces, key=lambda f: f.detection.box[0])
    return [f.name for f in ordered if f.name is not None]


def test_enrolment_used_every_training_photo(recognizer: Recognizer) -> None:
    assert recognizer.gallery.people() == {
        "alex_lacamoire": 1,
        "biden": 2,
        "kit_harington": 2,
        "obama": 2,
        "rose_leslie": 2,
    }


def test_every_test_face_gets_the_right_name(recognizer: Recognizer) -> None:
    names = sorted(KNN_EXPECTED)
    results = recognizer.recognize_bytes([(SCENES / "knn" / "test" / n).read_bytes() for n in names])
    for name, result in zip(names, results, strict=True):
        assert isinstance(result, ImageResult)
        assert known_faces_left_to_right(result) == KNN_EXPECTED[name], name
        for face in result.faces:
            if face.name is not None:
                assert face.similarity >= recognizer.threshold
                assert face.candidates[0].name == face.name
                assert face.margin > 0


def test_main_face_answer_for_single_person_photos(recognizer: Recognizer) -> None:
    for name in ("alex_lacamoire1.jpg", "johnsnow_test1.jpg", "obama1.jpg"):
        (result,) = recognizer.recognize_bytes([(SCENES / "knn" / "test" / name).read_bytes()])
        assert isinstance(result, ImageResult)
        assert result.main_name == KNN_EXPECTED[name][0]


def test_strangers_are_unknown(recognizer: Recognizer) -> None:
    strangers = sorted((LFW / "images").glob("Aaron_*/*.jpg"))[:8]
    results = recognizer.recognize_bytes([p.read_bytes() for p in strangers])
    answered = [r for r in results if isinstance(r, ImageResult) and r.main_face is not None]
    assert len(answered) == len(strangers)
    assert all(r.main_name is None for r in answered)


def test_bad_input_in_a_batch_fails_alone(recognizer: Recognizer) -> None:
    good = (SCENES / "knn" / "test" / "obama1.jpg").read_bytes()
    results = recognizer.recognize_bytes([b"", good, b"GIF89a broken", good[:500]])
    assert [type(r).__name__ for r in results] == [
        "InvalidImageError",
        "ImageResult",
        "InvalidImageError",
        "InvalidImageError",
    ]
    assert isinstance(results[0], InvalidImageError) and results[0].reason == "empty"
    assert isinstance(results[1], ImageResult) and results[1].main_name == "obama"


def test_no_face_photo_is_an_empty_answer_not_an_error(recognizer: Recognizer) -> None:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (320, 240), (200, 180, 160)).save(buffer, "JPEG")
    (result,) = recognizer.recognize_bytes([buffer.getvalue()])
    assert isinstance(result, ImageResult)
    assert result.faces == () and result.main_face is None and result.main_name is None


def test_results_carry_model_id_and_timings(recognizer: Recognizer) -> None:
    (result,) = recognizer.recognize_bytes([(SCENES / "knn" / "test" / "kit_with_rose.jpg").read_bytes()])
    assert isinstance(result, ImageResult)
    assert result.model_id == recognizer.embedder.model_id
    timings = result.timings
    assert timings.decode_ms > 0 and timings.detect_ms > 0 and timings.embed_ms > 0 and timings.match_ms >= 0
    assert timings.batch_size == 1
    # Decoding a JPEG of a few hundred pixels a side is a small part of the work; detection is not.
    assert timings.decode_ms < timings.detect_ms + timings.embed_ms


def test_the_service_batch_path_decodes_within_the_configured_pixel_limit(models: Models) -> None:
    """run_jobs (what a Recognizer replica runs) decodes every kind of job within the recognizer's max_pixels,
    enrolment included, and reports decode time in each recognition."""
    from serve_app.jobs import Detections, DetectJob, EnrolJob, JobError, RecognizeJob, run_jobs

    photo = (SCENES / "knn" / "test" / "obama1.jpg").read_bytes()
    pixels = decode_image(photo).pixels.shape[0] * decode_image(photo).pixels.shape[1]
    gallery = Gallery(models.embedder.model_id, models.embedder.dim)
    roomy = Recognizer(models.detector, models.embedder, gallery, threshold=models.threshold, max_pixels=pixels)
    recognized, detected, enrolled = run_jobs(
        roomy, [RecognizeJob(photo), DetectJob(photo), EnrolJob((("obama1.jpg", photo),))]
    )
    assert isinstance(recognized, ImageResult) and isinstance(detected, Detections)
    assert recognized.timings.decode_ms > 0 and recognized.timings.detect_ms > 0
    assert len(recognized.faces) == 1 and len(detected.faces) == 1
    assert isinstance(enrolled, list) and enrolled[0].refused is None and enrolled[0].embedding is not None

    tight = Recognizer(models.detector, models.embedder, gallery, threshold=models.threshold, max_pixels=pixels - 1)
    recognized, detected, enrolled = run_jobs(
        tight, [RecognizeJob(photo), DetectJob(photo), EnrolJob((("obama1.jpg", photo),))]
    )
    assert isinstance(recognized, JobError) and recognized.reason == "too_large"
    assert isinstance(detected, JobError) and detected.reason == "too_large"
    assert isinstance(enrolled, list) and enrolled[0].embedding is None
    assert enrolled[0].refused is not None and "not a usable image" in enrolled[0].refused


def test_embeddings_are_unit_float32(models: Models) -> None:
    images = [decode_image(p.read_bytes()) for p in sorted((LFW / "images").glob("Abd*/*.jpg"))[:4]]
    vectors = embed_main_faces(models.detector, models.embedder, images)
    stacked = np.stack([v for v in vectors if v is not None])
    assert stacked.dtype == np.float32 and stacked.shape[1] == models.embedder.dim
    assert np.allclose(np.linalg.norm(stacked, axis=1), 1.0, atol=1e-5)


def test_embedder_batches_agree_with_single_passes(models: Models) -> None:
    image = decode_image((SCENES / "selfie-many-people.jpg").read_bytes())
    crops = models.detector.crops(image, models.detector.detect([image])[0])
    together = models.embedder.embed(crops)
    alone = np.concatenate([models.embedder.embed(crops[i : i + 1]) for i in range(len(crops))])
    assert np.allclose(together, alone, atol=1e-4)
