"""Input standardisation for FaceNet checkpoints: each was trained with one, and loses 1-2 LFW points with the other."""

from __future__ import annotations

import math

import torch


def fixed_standardization(crops: torch.Tensor) -> torch.Tensor:
    """``(x - 127.5) / 128``: what the CASIA-WebFace and facenet-pytorch checkpoints were trained on."""
    return (crops - 127.5) / 128.0


def prewhiten(batch: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation this checkpoint was trained with: ``(x - mean) / max(std, 1/sqrt(n))``.

    ``batch`` is a float NCHW tensor of pixels in 0..255; mean and (population) standard deviation are taken over
    each image's ``n = C*H*W`` values, in float64 so the statistics do not depend on summation order. The floor
    on the deviation keeps a flat image from dividing by zero. Returns the input's dtype and device.
    """
    if batch.ndim != 4:
        raise ValueError(f"expected an NCHW batch, got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise TypeError(f"expected a floating-point batch, got {batch.dtype}")
    flat = batch.flatten(1).double()
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, correction=0).clamp_min(1.0 / math.sqrt(flat.shape[1]))
    shape = (-1, 1, 1, 1)
    return (batch - mean.view(shape).to(batch.dtype)) / std.view(shape).to(batch.dtype)
