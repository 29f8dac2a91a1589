"""The embedding checkpoints this service can run, by name, and how each one is loaded.

Every checkpoint is facenet-pytorch's ``InceptionResnetV1`` with different weights, output size and input
standardisation. Embeddings from different checkpoints are not comparable, so each has a stable ``model_id`` that
galleries record.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from facenet_pytorch import InceptionResnetV1
from torch import nn

from serve_app.model.weights.files import casia_graph_path, keras_h5_path

log = logging.getLogger(f"ray.serve.{__name__}")

DEFAULT_CHECKPOINT = "facenet-keras-128"


class Standardization(StrEnum):
    """How a checkpoint wants its 0..255 crops scaled (each loses 1-2 LFW points with the other's)."""

    #: ``(x - 127.5) / 128``: the CASIA-WebFace graph and facenet-pytorch's own checkpoints.
    FIXED = "fixed"
    #: ``(x - mean) / max(std, 1/sqrt(n))`` per image: the Keras FaceNet (MS-Celeb-1M) port.
    PREWHITEN = "prewhiten"


class UnknownCheckpointError(ValueError):
    """The requested checkpoint name is neither a known name nor a readable ``.pt`` state dict."""


@dataclass(frozen=True)
class Checkpoint:
    """A loadable embedding network and the facts needed to use it correctly."""

    name: str
    model_id: str
    dim: int
    standardization: Standardization
    #: Cosine-similarity threshold for "same person", chosen on LFW View 1 DevTrain (``facerec eval lfw``).
    threshold: float
    load: Callable[[], nn.Module]
    #: The DevTrain threshold with flip averaging, where it was measured (flipped embeddings agree more).
    flip_threshold: float | None = None

    def threshold_for(self, flip: bool) -> float:
        return self.flip_threshold if flip and self.flip_threshold is not None else self.threshold

    def model_id_for(self, flip: bool) -> str:
        """The embedding space's id: flip averaging changes the vectors, so it is part of the id."""
        return self.model_id + ("+flip" if flip else "")


# Converters are imported when their checkpoint is loaded: each pulls in its own file-format reader.
def _keras() -> nn.Module:
    from serve_app.model.weights.keras_h5 import build_keras_facenet_model, load_keras_facenet_state_dict

    model: nn.Module = build_keras_facenet_model()
    model.load_state_dict(load_keras_facenet_state_dict(keras_h5_path()), strict=True)
    return model


def _casia() -> nn.Module:
    from serve_app.model.weights.casia_graphdef import load_casia_state_dict

    model: nn.Module = InceptionResnetV1(classify=False)
    model.load_state_dict(load_casia_state_dict(casia_graph_path()), strict=True)
    return model


def _vggface2() -> nn.Module:
    # facenet-pytorch downloads these weights from GitHub on first use: only where a network exists.
    model: nn.Module = InceptionResnetV1(pretrained="vggface2", classify=False)
    return model


# Thresholds: see the README's "Choosing the embedder" table for the runs that produced them.
CHECKPOINTS: dict[str, Checkpoint] = {
    "facenet-keras-128": Checkpoint(
        "facenet-keras-128",
        "facenet-keras-ms-celeb-128-v1",
        128,
        Standardization.PREWHITEN,
        0.40,
        _keras,
        flip_threshold=0.42,
    ),
    "casia-webface-512": Checkpoint(
        "casia-webface-512", "facenet-casia-webface-512-20180408", 512, Standardization.FIXED, 0.35, _casia
    ),
    "vggface2-512": Checkpoint(
        "vggface2-512", "facenet-pytorch-vggface2-512", 512, Standardization.FIXED, 0.40, _vggface2
    ),
}


def resolve_checkpoint(name: str, threshold: float | None = None) -> Checkpoint:
    """A checkpoint by registry name, or a local ``.pt`` state dict for ``InceptionResnetV1`` (fixed std.)."""
    if name in CHECKPOINTS:
        return CHECKPOINTS[name]
    path = Path(name)
    if path.suffix == ".pt" and path.is_file():
        # Read, hashed and loaded once per version of the file (the model id and threshold are asked often).
        stat = path.stat()
        return _resolve_pt(str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(path), threshold)
    known = ", ".join(CHECKPOINTS)
    raise UnknownCheckpointError(f"unknown checkpoint {name!r}: use one of {known}, or a path to a .pt state dict")


@functools.lru_cache(maxsize=4)
def _resolve_pt(resolved: str, mtime_ns: int, size: int, name: str, threshold: float | None) -> Checkpoint:
    """A ``.pt`` state dict's checkpoint; the file's modification time and size are part of the key."""
    path = Path(resolved)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "last_linear.weight" not in state:
        raise UnknownCheckpointError(f"{path} is not an InceptionResnetV1 state dict (no last_linear.weight)")
    dim = int(state["last_linear.weight"].shape[0])

    def load_pt() -> nn.Module:
        model: nn.Module = InceptionResnetV1(classify=False)
        if dim != 512:
            model.last_linear = nn.Linear(1792, dim, bias=False)
            model.last_bn = nn.BatchNorm1d(dim, eps=0.001, momentum=0.1, affine=True)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")}, strict=True)
        return model

    return Checkpoint(
        name=name,
        model_id=f"pt-{digest}",
        dim=dim,
        standardization=Standardization.FIXED,
        threshold=threshold if threshold is not None else 0.4,
        load=load_pt,
    )
