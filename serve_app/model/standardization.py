"""Input standardisation for FaceNet checkpoints: each was trained with one, and loses 1-2 LFW points with the other."""

from __future__ import annotations

import math

import torch


def fixed_standardization(crops: torch.Tensor) -> torch.Tensor:
    """``(x - 127.5) / 128``: what the CASIA-WebFace and facenet-pytorch checkpoints were trained on."""
    return (crops - 127.5) / 128.0


def prewhiten(crops: torch.Tensor) -> torch.Tensor:
    """Per-image ``(x - mean) / max(std, 1/sqrt(n))`` over an NCHW batch in 0..255 (Sandberg's FaceNet)."""
    flat = crops.reshape(crops.shape[0], -1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1, unbiased=False).clamp_min(1.0 / math.sqrt(flat.shape[1])).view(-1, 1, 1, 1)
    return (crops - mean) / std
