"""Load the Keras FaceNet HDF5 file (Inception-ResNet-v1, MS-Celeb-1M, 128-d) into facenet-pytorch, with h5py only.

The file is a Keras model saved by TensorFlow's Keras: ``model_weights/<layer>/<layer>/<var>:0`` datasets plus a
JSON ``model_config``. Its layer names follow Sandberg's FaceNet scopes joined by ``_``, so each maps onto one
module of facenet-pytorch's ``InceptionResnetV1`` (see :func:`keras_layer_to_torch_prefix`). Differences from
the stock facenet-pytorch network: a 128-d bottleneck instead of 512, and BatchNorm layers without gamma
(``scale=False``), which become ``weight = 1``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from facenet_pytorch import InceptionResnetV1
from torch import nn

log = logging.getLogger(__name__)

EMBEDDING_DIM = 128
BN_EPS = 1e-3
#: Residual scales in the file's Lambda layers; facenet-pytorch hard-codes the same values, and a file with other
#: scales would convert silently into a different network.
EXPECTED_SCALES = {"block35": 0.17, "block17": 0.10, "block8": 0.20, "block8_last": 1.0}

_STEM = re.compile(r"^Conv2d_(1a|2a|2b|3b|4a|4b)_\dx\d$")
_BLOCK = re.compile(r"^(Block35|Block17|Block8)_(\d+)_(.+)$")
_MIXED = re.compile(r"^(Mixed_6a|Mixed_7a)_(.+)$")
_BRANCH = re.compile(r"^Branch_(\d)_Conv2d_(?:(0a|0b|0c|1a)_)?\dx\d$")
# How many convolutions each branch of each block has: a branch with one conv is a bare BasicConv2d in
# facenet-pytorch (``branch0``), a longer one an nn.Sequential (``branch1.0``, ``branch1.1`` ...).
_BRANCH_LENGTHS = {
    "Block35": {0: 1, 1: 2, 2: 3},
    "Block17": {0: 1, 1: 3},
    "Block8": {0: 1, 1: 3},
    "Mixed_6a": {0: 1, 1: 3},
    "Mixed_7a": {0: 2, 1: 2, 2: 3},
}
_CONV_RANK = {"0a": 0, "0b": 1, "0c": 2}


class KerasWeightsError(ValueError):
    """The HDF5 file is not the Keras FaceNet model this loader knows."""


def keras_layer_to_torch_prefix(layer: str) -> str:
    """The facenet-pytorch module for a Keras layer name (convolution layers; ``_BatchNorm`` suffix allowed).

    ``Block17_3_Branch_1_Conv2d_0b_1x7`` -> ``repeat_2.2.branch1.1``; ``Conv2d_1a_3x3`` -> ``conv2d_1a``;
    ``Block8_6_Conv2d_1x1`` -> ``block8.conv2d``; ``Bottleneck`` -> ``last_linear``. A ``..._BatchNorm`` layer
    maps to the same module as its convolution (the caller appends ``.bn``); ``..._Activation`` layers hold no
    weights and are not mapped.
    """
    base = layer.removesuffix("_BatchNorm")
    if base == "Bottleneck":
        return "last_bn" if layer.endswith("_BatchNorm") else "last_linear"
    stem = _STEM.match(base)
    if stem:
        return f"conv2d_{stem.group(1)}"
    block = _BLOCK.match(base)
    mixed = _MIXED.match(base)
    if block:
        kind, number, rest = block.group(1), int(block.group(2)), block.group(3)
        if kind == "Block8" and number == 6:
            module = "block8"
        else:
            repeat = {"Block35": "repeat_1", "Block17": "repeat_2", "Block8": "repeat_3"}[kind]
            module = f"{repeat}.{number - 1}"
    elif mixed:
        kind, rest = mixed.group(1), mixed.group(2)
        module = kind.lower()
    else:
        raise KerasWeightsError(f"unexpected layer name {layer!r}")
    if rest == "Conv2d_1x1":
        return f"{module}.conv2d"
    branch = _BRANCH.match(rest)
    if not branch:
        raise KerasWeightsError(f"unexpected layer name {layer!r}")
    index, conv = int(branch.group(1)), branch.group(2)
    length = _BRANCH_LENGTHS[kind].get(index)
    if length is None:
        raise KerasWeightsError(f"{layer!r}: {kind} has no branch {index}")
    if length == 1:
        return f"{module}.branch{index}"
    # "1a" (the stride-2 reduction conv) always ends its branch, whatever comes before it.
    rank = length - 1 if conv == "1a" else _CONV_RANK[conv or "0a"]
    return f"{module}.branch{index}.{rank}"


def build_keras_facenet_model() -> InceptionResnetV1:
    """facenet-pytorch's InceptionResnetV1 with this checkpoint's 128-d head (weights uninitialised)."""
    model = InceptionResnetV1(classify=False)
    model.last_linear = nn.Linear(1792, EMBEDDING_DIM, bias=False)
    model.last_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=BN_EPS, momentum=0.1, affine=True)
    return model


def _check_scales(config_json: str) -> None:
    layers = json.loads(config_json)["config"]["layers"]
    scales = [float(layer["config"]["arguments"]["scale"]) for layer in layers if layer["class_name"] == "Lambda"]
    expected = (
        [EXPECTED_SCALES["block35"]] * 5
        + [EXPECTED_SCALES["block17"]] * 10
        + [EXPECTED_SCALES["block8"]] * 5
        + [EXPECTED_SCALES["block8_last"]]
    )
    if not np.allclose(scales, expected):
        raise KerasWeightsError(f"residual scales {scales} differ from facenet-pytorch's {expected}")


def load_keras_facenet_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A complete state dict for :func:`build_keras_facenet_model` from the Keras HDF5 file."""
    import h5py

    started = time.perf_counter()
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise KerasWeightsError(f"{path} is not a readable HDF5 file: {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    with handle:
        if "model_weights" not in handle or "model_config" not in handle.attrs:
            raise KerasWeightsError(f"{path} is not a saved Keras model (no model_weights / model_config)")
        config = handle.attrs["model_config"]
        _check_scales(config.decode() if isinstance(config, bytes) else str(config))
        weights = handle["model_weights"]
        for layer in weights:
            group = weights[layer]
            variables: dict[str, np.ndarray] = {}
            group.visititems(
                lambda name, obj, out=variables: (
                    out.__setitem__(name.rsplit("/", 1)[-1].removesuffix(":0"), obj[()])
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
            if not variables:
                continue  # activations, pooling, concatenation, lambdas, dropout: no weights
            prefix = keras_layer_to_torch_prefix(layer)
            state.update(_convert(layer, prefix, variables))
    model_keys = build_keras_facenet_model().state_dict()
    missing = sorted(set(model_keys) - set(state))
    extra = sorted(set(state) - set(model_keys))
    wrong = [k for k in set(state) & set(model_keys) if state[k].shape != model_keys[k].shape]
    if missing or extra or wrong:
        raise KerasWeightsError(f"{path}: missing {missing[:5]}, unexpected {extra[:5]}, mis-shaped {wrong[:5]}")
    log.info("converted %s into %d tensors in %.2f s", path, len(state), time.perf_counter() - started)
    return state


def _convert(layer: str, prefix: str, variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    if layer.endswith("_BatchNorm"):
        if set(variables) != {"beta", "moving_mean", "moving_variance"}:
            raise KerasWeightsError(f"{layer}: unexpected BatchNorm variables {sorted(variables)}")
        bn = prefix if prefix == "last_bn" else f"{prefix}.bn"
        size = variables["beta"].shape[0]
        return {
            f"{bn}.weight": torch.ones(size),  # scale=False in Keras: gamma is fixed at 1
            f"{bn}.bias": tensor(variables["beta"]),
            f"{bn}.running_mean": tensor(variables["moving_mean"]),
            f"{bn}.running_var": tensor(variables["moving_variance"]),
            f"{bn}.num_batches_tracked": torch.tensor(0, dtype=torch.long),
        }
    kernel = variables.get("kernel")
    if kernel is None:
        raise KerasWeightsError(f"{layer}: no kernel")
    if prefix == "last_linear":
        return {"last_linear.weight": tensor(kernel.T)}  # Dense kernels are (in, out); Linear wants (out, in)
    weight = tensor(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    if "bias" in variables:  # the residual "up" projections: plain convolutions
        return {f"{prefix}.weight": weight, f"{prefix}.bias": tensor(variables["bias"])}
    return {f"{prefix}.conv.weight": weight}
