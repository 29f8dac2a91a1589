"""The Embedder folds BatchNorm into the layers before it: same embeddings as the unfused network, no BatchNorm left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from serve_app.model.embedder import Embedder
from serve_app.model.images import decode_image
from serve_app.model.pipeline import Models
from tests.conftest import LFW


@pytest.fixture(scope="module")
def lfw_crops(models: Models) -> torch.Tensor:
    """The main face of a few real LFW photos, as the embedder receives them."""
    paths = sorted(Path(LFW, "images").glob("*/*.jpg"))[:6]
    if not paths:
        pytest.fail(f"no LFW photos under {LFW}")
    images = [decode_image(path.read_bytes()) for path in paths]
    crops = []
    for image, found in zip(images, models.detector.detect_all(images), strict=True):
        face = found.subject()
        if face is not None:
            crops.append(models.detector.crops(image, [face]))
    return torch.cat(crops)


def test_no_batch_norm_remains(models: Models) -> None:
    batch_norms = [
        name for name, m in models.embedder.network.named_modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)
    ]
    assert batch_norms == []


def test_fused_embeddings_equal_unfused(models: Models, lfw_crops: torch.Tensor) -> None:
    fused = Embedder(models.embedder.checkpoint, precision="float32")
    unfused = Embedder(models.embedder.checkpoint, precision="float32")
    unfused.network = models.embedder.checkpoint.load().eval().to(memory_format=torch.channels_last)
    assert any(isinstance(m, nn.BatchNorm2d) for m in unfused.network.modules())

    cosines = (fused.embed(lfw_crops) * unfused.embed(lfw_crops)).sum(axis=1)
    assert len(cosines) >= 4
    assert np.all(cosines >= 0.99999), cosines
