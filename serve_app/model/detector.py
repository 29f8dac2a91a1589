"""Face detection: MTCNN (weights from the facenet-pytorch wheel), batched over images.

The networks are facenet-pytorch's; the stages around them (pyramid, crops) are :mod:`mtcnn_batched`'s, which
give facenet-pytorch's answers with one gather per stage instead of a resize per face.

Three steps, kept separate as in facenet-pytorch: detect (every face, in original pixels), select (which face is
"the" face of a photo), extract (aligned-size crops for the embedder).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from facenet_pytorch import MTCNN
from facenet_pytorch.models.utils.detect_face import extract_face
from PIL import Image

from serve_app.model.images import DecodedImage
from serve_app.model.mtcnn_batched import detect_faces

Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclass(frozen=True)
class DetectorConfig:
    """Detection settings. Sizes are in original-image pixels."""

    #: Faces with a lower MTCNN probability are left out of a photo's list of faces. MTCNN reports a few false
    #: faces (hands, objects) at about 0.86-0.87 on group photos while real faces score >= 0.975, so 0.95 separates
    #: them. Below it, faces MTCNN's own stages kept are still candidates where a photo is known to show one
    #: person (see :meth:`FaceDetections.subject`).
    probability_threshold: float = 0.95
    #: Smallest face (box side, original pixels) searched for in a photo of ordinary size.
    min_face_size: int = 20
    #: Longest side the detector sees. MTCNN's cost grows with pixel count (about 22 ms at 240x300, 200 ms at
    #: 1280x886 on 2 threads), so larger photos are downscaled for detection and boxes mapped back.
    max_side: int = 1280
    #: Photos whose shorter side is below this (thumbnails, legacy 64x64 crops) are detected on a bicubic upscale
    #: to this shorter side. MTCNN finds a face at the pyramid level where it is 12 px and then judges it from
    #: 24 px (RNet) and 48 px (ONet) crops of that level: on a 64x64 photo a 20 px face would be magnified with
    #: nearest-neighbour blocks by the network's own resizing, and ONet scores it below the threshold.
    small_photo_side: int = 160
    #: The most a small photo is magnified for detection (a 16 px photo holds no face worth finding).
    max_upscale: float = 4.0
    #: In a small photo, faces down to this share of its shorter side are searched for, even below
    #: ``min_face_size``: a 64x64 crop's face is 18-25 px wide.
    small_photo_min_face: float = 0.2
    #: MTCNN's per-stage thresholds and pyramid factor (facenet-pytorch defaults, from the MTCNN paper's code).
    stage_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    pyramid_factor: float = 0.709
    #: Crop geometry for the embedder: FaceNet's 160x160 input, with a 14-pixel margin (in crop pixels).
    crop_size: int = 160
    crop_margin: int = 14


@dataclass(frozen=True)
class DetectedFace:
    """One face: its box ``(x1, y1, x2, y2)``, MTCNN probability and 5 landmarks, all in original pixels.

    Landmarks are left eye, right eye, nose, left mouth corner, right mouth corner (from the viewer's side).
    """

    box: Box
    probability: float
    landmarks: tuple[Point, Point, Point, Point, Point]

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


@dataclass(frozen=True)
class FaceDetections:
    """What MTCNN found in one photo: faces at the probability threshold, and weaker candidates below it."""

    width: int
    height: int
    #: Faces at or above ``probability_threshold``, most probable first: the photo's list of faces.
    faces: tuple[DetectedFace, ...]
    #: Faces MTCNN's own stages kept but that score below the threshold (profiles, blur, occlusion, or false faces
    #: such as hands), most probable first. Never listed as faces; see :meth:`subject`.
    weak: tuple[DetectedFace, ...]

    @property
    def main_face(self) -> int | None:
        """Index into :attr:`faces` of the photo's main face."""
        return main_face_index(self.faces, self.width, self.height)

    def subject(self) -> DetectedFace | None:
        """The face of a photo that is known to show one person (legacy answer, verify, enrolment, evaluation).

        The main confident face; where there is none, the main one of the weaker candidates rather than nothing:
        in such a photo the person is there, and MTCNN's stage thresholds already rejected what is not face-like.
        """
        main = self.main_face
        if main is not None:
            return self.faces[main]
        weak = main_face_index(self.weak, self.width, self.height)
        return None if weak is None else self.weak[weak]


def exact_convolutions_on(device: torch.device) -> None:
    """On a CUDA device, convolutions in full float32 (no TF32), as on the CPU.

    cuDNN's TF32 (torch's default for convolutions) moved one LFW photo's MTCNN box by 4.7 px on an H200, and that
    face's embedding to a cosine of 0.966 against the CPU's; with TF32 off every box and embedding matched the CPU's
    (cosine 1.000000, 16 of 16; bench/results/gpu/gpu_agreement.json). A gallery enrolled on CPU replicas must
    match on GPU ones, so exactness wins over the 10-30 % that TF32 saves there. Process-wide, like the flag.
    """
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


class FaceDetector:
    """Batched MTCNN. Images of equal (downscaled) size share one pass through the network pyramid."""

    def __init__(self, config: DetectorConfig | None = None, device: torch.device | None = None) -> None:
        self.config = config or DetectorConfig()
        self.device = device or torch.device("cpu")
        exact_convolutions_on(self.device)
        # MTCNN() only loads the pnet/rnet/onet weights bundled in the wheel; it downloads nothing.
        mtcnn = MTCNN(device=self.device)
        mtcnn.eval()
        # Channels-last weights make oneDNN run the convolutions and pooling in NHWC: the same boxes (to 3e-5 px),
        # about a third less detection time on CPU.
        mtcnn.to(memory_format=torch.channels_last)
        self._pnet, self._rnet, self._onet = mtcnn.pnet, mtcnn.rnet, mtcnn.onet

    def detect(self, images: Sequence[DecodedImage]) -> list[list[DetectedFace]]:
        """Every face in every image at the probability threshold, in original pixels, most probable first."""
        return [list(found.faces) for found in self.detect_all(images)]

    def detect_all(self, images: Sequence[DecodedImage]) -> list[FaceDetections]:
        """Every face in every image, split into confident faces and weaker candidates MTCNN's stages kept."""
        results = [FaceDetections(image.width, image.height, (), ()) for image in images]
        groups: dict[tuple[int, int, float], list[tuple[int, np.ndarray]]] = defaultdict(list)
        for index, image in enumerate(images):
            pixels, scale = self._detection_view(image)
            groups[(pixels.shape[0], pixels.shape[1], scale)].append((index, pixels))
        for (height, width, scale), members in groups.items():
            min_face = self.min_face_size(images[members[0][0]])
            # The pyramid starts at 12 / min_size: the smallest face searched for becomes one 12-pixel PNet cell.
            min_size = max(12.0, min_face * scale)
            if min(height, width) < min_size:
                continue  # smaller than the smallest face searched for: MTCNN would build an empty pyramid
            batch = torch.from_numpy(np.stack([pixels for _, pixels in members])).to(self.device)
            with torch.inference_mode():
                batch_boxes, batch_points = detect_faces(
                    batch,
                    min_size,
                    self._pnet,
                    self._rnet,
                    self._onet,
                    list(self.config.stage_thresholds),
                    self.config.pyramid_factor,
                    self.device,
                )
            for (index, _), boxes, points in zip(members, batch_boxes, batch_points, strict=True):
                results[index] = self._faces(boxes, points, scale, images[index], min_face)
        return results

    def min_face_size(self, image: DecodedImage) -> float:
        """The smallest face side (original pixels) searched for in ``image``."""
        shorter = min(image.width, image.height)
        if shorter < self.config.small_photo_side:
            return min(float(self.config.min_face_size), self.config.small_photo_min_face * shorter)
        return float(self.config.min_face_size)

    def _detection_view(self, image: DecodedImage) -> tuple[np.ndarray, float]:
        longest, shorter = max(image.width, image.height), min(image.width, image.height)
        if longest > self.config.max_side:
            scale = self.config.max_side / longest
            resample = Image.Resampling.BILINEAR
        elif shorter < self.config.small_photo_side:
            scale = min(self.config.max_upscale, self.config.small_photo_side / shorter)
            resample = Image.Resampling.BICUBIC
        else:
            return image.pixels, 1.0
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resized = Image.fromarray(image.pixels).resize(size, resample, reducing_gap=2.0 if scale < 1 else None)
        return np.asarray(resized), scale

    def _faces(
        self, boxes: np.ndarray, points: np.ndarray, scale: float, image: DecodedImage, min_face: float
    ) -> FaceDetections:
        confident: list[DetectedFace] = []
        weak: list[DetectedFace] = []
        for row, marks in zip(np.asarray(boxes).reshape(-1, 5), np.asarray(points).reshape(-1, 5, 2), strict=True):
            x1, y1, x2, y2 = (float(v) / scale for v in row[:4])
            box = (max(0.0, x1), max(0.0, y1), min(float(image.width), x2), min(float(image.height), y2))
            if min(box[2] - box[0], box[3] - box[1]) < min_face or box[2] <= box[0]:
                continue
            landmarks = tuple((float(x) / scale, float(y) / scale) for x, y in marks)
            face = DetectedFace(box=box, probability=float(row[4]), landmarks=landmarks)  # type: ignore[arg-type]
            (confident if face.probability >= self.config.probability_threshold else weak).append(face)
        confident.sort(key=lambda face: face.probability, reverse=True)
        weak.sort(key=lambda face: face.probability, reverse=True)
        return FaceDetections(image.width, image.height, tuple(confident), tuple(weak))

    def crops(self, image: DecodedImage, faces: Sequence[DetectedFace]) -> torch.Tensor:
        """Square crops (``(N, 3, size, size)`` float32, 0..255) around each face, from the full-resolution image."""
        if not faces:
            return torch.empty((0, 3, self.config.crop_size, self.config.crop_size))
        pil = Image.fromarray(image.pixels)
        return torch.stack(
            [extract_face(pil, np.asarray(face.box), self.config.crop_size, self.config.crop_margin) for face in faces]
        )


def main_face_index(faces: Sequence[DetectedFace], width: int, height: int, center_weight: float = 2.0) -> int | None:
    """The photo's main face: box area minus ``center_weight`` x squared distance from the image centre.

    Never simply the largest box: on LFW the largest is a background face in 42 of 1,549 DevTest photos, which
    alone costs 3 points of verification accuracy (facenet-pytorch's ``center_weighted_size`` heuristic).
    """
    if not faces:
        return None
    cx, cy = width / 2.0, height / 2.0

    def score(face: DetectedFace) -> float:
        fx = (face.box[0] + face.box[2]) / 2.0
        fy = (face.box[1] + face.box[3]) / 2.0
        return face.width * face.height - center_weight * ((fx - cx) ** 2 + (fy - cy) ** 2)

    return max(range(len(faces)), key=lambda i: score(faces[i]))


def centre_face(width: int, height: int, share: float = 0.45) -> DetectedFace:
    """A stand-in face: the central square (``share`` of the shorter side) of a photo known to be centred on one.

    For evaluation only (LFW's deep-funneled photos are centred on the face): where MTCNN finds no candidate at
    all, the pair is scored from this region rather than dropped.
    """
    side = share * min(width, height)
    cx, cy = width / 2.0, height / 2.0
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return DetectedFace(box=box, probability=0.0, landmarks=((cx, cy),) * 5)
