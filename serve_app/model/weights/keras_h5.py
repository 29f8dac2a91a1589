"""Load the Keras FaceNet HDF5 file (Inception-ResNet-v1, MS-Celeb-1M, 128-d) into facenet-pytorch, with h5py only.

The file is a whole Keras model saved as HDF5: a JSON ``model_config`` attribute plus, under ``model_weights``,
one group per layer whose ``weight_names`` attribute lists its arrays (``<layer>/kernel:0`` ...). It appears to
be a port of David Sandberg's 20170512-110547 checkpoint, and its layer names are Sandberg's TF-slim scopes joined
by ``_``, so each one maps onto a module of facenet-pytorch's ``InceptionResnetV1``
(:func:`keras_layer_to_torch_prefix`). Two differences from the stock facenet-pytorch network:

* the head is a 128-d bottleneck (``Linear(1792, 128, bias=False)`` + ``BatchNorm1d(128)``), not 512-d;
* no BatchNorm stores gamma (Keras ``scale=False``): gamma is the constant 1, so ``bn.weight`` is set to ones.

Using it correctly:

* inputs are RGB 160x160 crops standardised per image (``serve_app.model.standardization.prewhiten``), not
  with the fixed ``(x - 127.5) / 128`` of facenet-pytorch's own checkpoints;
* the Keras model's output (its ``Bottleneck_BatchNorm``) is not L2-normalised, while facenet-pytorch's
  ``forward`` L2-normalises after ``last_bn``; the directions, and so all cosine similarities, are the same.

``tests/test_keras_h5.py`` holds the converted model to outputs computed by Keras itself.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from facenet_pytorch import InceptionResnetV1
from torch import nn

log = logging.getLogger(f"ray.serve.{__name__}")

EMBEDDING_DIM = 128
#: Every BatchNorm in the file uses Keras epsilon 1e-3 (facenet-pytorch's BasicConv2d uses the same).
BN_EPS = 1e-3
#: The Keras ``Dropout`` rate (keep probability 0.8 in Sandberg's training); only matters in train mode.
KERAS_DROPOUT = 0.2


class KerasWeightsError(ValueError):
    """The HDF5 file is not the Keras FaceNet model this loader knows (unreadable, unknown layers, wrong shapes)."""


# What a Keras layer becomes in torch:
#   unit    - the conv of a conv -> BatchNorm -> ReLU triple: facenet-pytorch's BasicConv2d (weights in ``.conv``)
#   conv    - a plain convolution with bias: the residual "up" projection ``<block>.conv2d``
#   linear  - the Dense bottleneck
#   bn, relu, pool, dropout - the other modules (only bn has parameters)
_Kind = Literal["unit", "conv", "linear", "bn", "relu", "pool", "dropout"]


@dataclass(frozen=True)
class _Target:
    prefix: str
    kind: _Kind


_FIXED = {
    "Bottleneck": _Target("last_linear", "linear"),
    "Bottleneck_BatchNorm": _Target("last_bn", "bn"),
    "MaxPool_3a_3x3": _Target("maxpool_3a", "pool"),
    "AvgPool": _Target("avgpool_1a", "pool"),
    "Dropout": _Target("dropout", "dropout"),
}
_STEM = re.compile(r"Conv2d_(1a|2a|2b|3b|4a|4b)_\d+x\d+")
_BLOCK_ID = re.compile(r"(Block35|Block17|Block8)_(\d+)")
_IN_BLOCK = re.compile(r"(Block(?:35|17|8)_\d+|Mixed_\da)_(.+)")
_BRANCH_CONV = re.compile(r"Branch_(\d)_Conv2d_(?:(0a|0b|0c|1a)_)?\d+x\d+")
_BRANCH_POOL = re.compile(r"Branch_(\d)_MaxPool_1a_3x3")
# Layers that do their work inside a torch ``forward``: the input, the concatenations (``Mixed_6a`` and ``Mixed_7a``
# are the reduction blocks' output concatenations), the residual scaling (Lambda) and sum (Add).
_GLUE = re.compile(r"input_\d+|lambda(_\d+)?|add(_\d+)?|.+_Concatenate|Mixed_\da")

# Keras block family -> the nn.Sequential that holds the repeats in facenet-pytorch, and how many it holds.
# The sixth Block8 (no ReLU) is facenet-pytorch's separate ``block8`` module.
_REPEATS = {"Block35": ("repeat_1", 5), "Block17": ("repeat_2", 10), "Block8": ("repeat_3", 5)}
# The convolutions of each branch, in forward order (the TF-slim ids sort that way: 0a < 0b < 0c < 1a; ``None``
# is the single unnumbered ``Conv2d_1x1``). A branch of one conv is a bare BasicConv2d in facenet-pytorch
# (``branch0``), a longer one an nn.Sequential indexed by position (``branch1.0``, ``branch1.1`` ...).
_BRANCHES: dict[str, dict[int, tuple[str | None, ...]]] = {
    "Block35": {0: (None,), 1: ("0a", "0b"), 2: ("0a", "0b", "0c")},
    "Block17": {0: (None,), 1: ("0a", "0b", "0c")},
    "Block8": {0: (None,), 1: ("0a", "0b", "0c")},
    "Mixed_6a": {0: ("1a",), 1: ("0a", "0b", "1a")},
    "Mixed_7a": {0: ("0a", "1a"), 1: ("0a", "1a"), 2: ("0a", "0b", "1a")},
}
# The max-pool branch of each reduction block.
_POOL_BRANCH = {"Mixed_6a": 2, "Mixed_7a": 3}


def keras_layer_to_torch_prefix(layer: str) -> str:
    """The facenet-pytorch module (state-dict prefix) that does the work of a Keras layer of this file.

    A Keras convolution followed by ``<conv>_BatchNorm`` and ``<conv>_Activation`` layers is one BasicConv2d in
    torch, named by the convolution: ``Conv2d_1a_3x3`` -> ``conv2d_1a`` (its kernel is ``conv2d_1a.conv.weight``),
    ``Block17_3_Branch_1_Conv2d_0b_1x7`` -> ``repeat_2.2.branch1.1``. The ``_BatchNorm`` and ``_Activation``
    layers are that unit's children: ``Conv2d_1a_3x3_BatchNorm`` -> ``conv2d_1a.bn``,
    ``Conv2d_1a_3x3_Activation`` -> ``conv2d_1a.relu``; a block's own ``Block35_1_Activation`` (after the
    residual sum) -> ``repeat_1.0.relu``. Also: ``Block8_6_Conv2d_1x1`` -> ``block8.conv2d`` (a plain conv with
    bias), ``Bottleneck`` -> ``last_linear``, ``Bottleneck_BatchNorm`` -> ``last_bn``, pooling and dropout layers
    -> their modules.

    Raises :class:`KerasWeightsError` for a name this architecture does not have, and for the parameterless glue
    layers (``input_1``, ``*_Concatenate``, ``Mixed_6a``, ``lambda_*``, ``add_*``) that have no module of their
    own in torch.
    """
    return _target(layer).prefix


def _target(layer: str) -> _Target:
    fixed = _FIXED.get(layer)
    if fixed is not None:
        return fixed
    if layer.endswith("_Activation"):
        base = layer.removesuffix("_Activation")
        if _BLOCK_ID.fullmatch(base):
            module = _block_module(base)
            if module == "block8":
                raise KerasWeightsError(f"{layer!r}: the last Block8 has no activation (noReLU in facenet-pytorch)")
            return _Target(f"{module}.relu", "relu")
        return _Target(f"{_unit(layer, base)}.relu", "relu")
    if layer.endswith("_BatchNorm"):
        return _Target(f"{_unit(layer, layer.removesuffix('_BatchNorm'))}.bn", "bn")
    return _base_target(layer)


def _unit(layer: str, base: str) -> str:
    """The BasicConv2d that a ``_BatchNorm`` / ``_Activation`` layer belongs to (only those have BN and ReLU)."""
    parent = _FIXED.get(base) or _base_target(base)
    if parent.kind != "unit":
        raise KerasWeightsError(f"{layer!r}: {base!r} ({parent.prefix}) has no BatchNorm or activation")
    return parent.prefix


def _block_module(block: str) -> str:
    """``Block35_3`` -> ``repeat_1.2``, ``Block8_6`` -> ``block8``, ``Mixed_6a`` -> ``mixed_6a``."""
    if block in _POOL_BRANCH:
        return block.lower()
    match = _BLOCK_ID.fullmatch(block)
    if match is None:
        raise KerasWeightsError(f"unexpected block {block!r}")
    family, number = match.group(1), int(match.group(2))
    repeat, count = _REPEATS[family]
    if family == "Block8" and number == count + 1:
        return "block8"
    if not 1 <= number <= count:
        raise KerasWeightsError(f"{block!r}: the network has {count} {family} blocks in {repeat}")
    return f"{repeat}.{number - 1}"


def _base_target(layer: str) -> _Target:
    """Map a layer name without ``_BatchNorm`` / ``_Activation`` suffix."""
    stem = _STEM.fullmatch(layer)
    if stem:
        return _Target(f"conv2d_{stem.group(1)}", "unit")
    inside = _IN_BLOCK.fullmatch(layer)
    block, rest = inside.groups() if inside else ("", "")
    family = block if block in _POOL_BRANCH else block.rsplit("_", 1)[0]  # "Mixed_6a" / "Block35_3" -> "Block35"
    if family not in _BRANCHES:
        if _GLUE.fullmatch(layer):
            raise KerasWeightsError(f"{layer!r} has no torch module: facenet-pytorch does it inside forward()")
        raise KerasWeightsError(f"unexpected layer name {layer!r}")
    module = _block_module(block)
    if rest == "Conv2d_1x1" and family.startswith("Block"):
        return _Target(f"{module}.conv2d", "conv")
    conv = _BRANCH_CONV.fullmatch(rest)
    if conv:
        branch, conv_id = int(conv.group(1)), conv.group(2)
        convs = _BRANCHES[family].get(branch, ())
        if conv_id not in convs:
            raise KerasWeightsError(f"{layer!r}: {family} has no such convolution in branch {branch}")
        if len(convs) == 1:
            return _Target(f"{module}.branch{branch}", "unit")
        return _Target(f"{module}.branch{branch}.{convs.index(conv_id)}", "unit")
    pool = _BRANCH_POOL.fullmatch(rest)
    if pool and _POOL_BRANCH.get(family) == int(pool.group(1)):
        return _Target(f"{module}.branch{pool.group(1)}", "pool")
    if _GLUE.fullmatch(layer):
        raise KerasWeightsError(f"{layer!r} has no torch module: facenet-pytorch does it inside forward()")
    raise KerasWeightsError(f"unexpected layer name {layer!r}")


def build_keras_facenet_model() -> InceptionResnetV1:
    """facenet-pytorch's InceptionResnetV1 with this checkpoint's 128-d head, in eval mode, weights uninitialised.

    Eval mode because the checkpoint is for inference: in train mode BatchNorm would normalise with batch
    statistics and dropout would be on. The ``forward`` output is L2-normalised (facenet-pytorch's choice).
    """
    model = InceptionResnetV1(classify=False, dropout_prob=KERAS_DROPOUT)
    model.last_linear = nn.Linear(1792, EMBEDDING_DIM, bias=False)
    model.last_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=BN_EPS)
    return model.eval()


def load_keras_facenet_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A complete state dict for :func:`build_keras_facenet_model`, read from the Keras HDF5 file at ``path``.

    Every weighted layer of the file must map onto a module of the torch network, every array must have the
    expected shape, and every key of the torch network must be filled, so that ``load_state_dict(strict=True)``
    cannot silently keep random weights. Raises :class:`KerasWeightsError` when the file is not a readable HDF5
    file or not this model, ``FileNotFoundError`` when it does not exist.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    started = time.perf_counter()
    model = build_keras_facenet_model()
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    try:
        with h5py.File(path, "r") as handle:
            config = handle.attrs.get("model_config")
            weights = handle.get("model_weights")
            if config is None or not isinstance(weights, h5py.Group):
                raise KerasWeightsError(f"{path} is not a whole Keras model saved as HDF5 (no model_config/weights)")
            _check_config(_text(config), model)
            layer_names = weights.attrs.get("layer_names")
            if layer_names is None:
                raise KerasWeightsError(f"{path}: model_weights has no layer_names attribute")
            for layer in _texts(layer_names):
                group = weights[layer]
                names = _texts(group.attrs.get("weight_names", []))
                if not names:
                    continue  # activations, pooling, concatenation, lambdas, dropout
                # "Conv2d_1a_3x3/kernel:0" -> "kernel"
                arrays = {name.rsplit("/", 1)[-1].removesuffix(":0"): np.asarray(group[name]) for name in names}
                for key, tensor in _convert(layer, arrays).items():
                    if key in state:
                        raise KerasWeightsError(f"{path}: layer {layer!r} writes {key} a second time")
                    if key not in expected:
                        raise KerasWeightsError(f"{path}: layer {layer!r} gives {key}, which the network lacks")
                    if tensor.shape != expected[key].shape:
                        raise KerasWeightsError(
                            f"{path}: layer {layer!r} gives {key} shape {tuple(tensor.shape)},"
                            f" the network wants {tuple(expected[key].shape)}"
                        )
                    state[key] = tensor
    except (OSError, KeyError) as exc:
        # h5py reports a truncated or corrupt file as OSError, a dangling name as KeyError.
        raise KerasWeightsError(f"{path}: unreadable Keras HDF5 file: {exc}") from exc
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KerasWeightsError(f"{path}: no weights for {len(missing)} tensors of the network, e.g. {missing[:5]}")
    log.info("read %d tensors from %s in %.2f s", len(state), path, time.perf_counter() - started)
    return state


def _convert(layer: str, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """One Keras layer's arrays as torch state-dict entries, keyed by full name."""
    target = _target(layer)
    prefix, kind = target.prefix, target.kind
    wanted = {
        "unit": {"kernel"},
        "conv": {"kernel", "bias"},
        "linear": {"kernel"},
        # gamma only when the layer was built with scale=True; this file has none.
        "bn": {"beta", "moving_mean", "moving_variance"} | ({"gamma"} & set(arrays)),
    }.get(kind)
    if wanted is None:
        raise KerasWeightsError(f"{layer!r} holds weights {sorted(arrays)}, but {prefix} ({kind}) has none")
    if set(arrays) != wanted:
        raise KerasWeightsError(f"{layer!r}: arrays {sorted(arrays)}, expected {sorted(wanted)}")
    if kind == "bn":
        beta = _tensor(arrays["beta"])
        return {
            f"{prefix}.weight": _tensor(arrays["gamma"]) if "gamma" in arrays else torch.ones_like(beta),
            f"{prefix}.bias": beta,
            f"{prefix}.running_mean": _tensor(arrays["moving_mean"]),
            f"{prefix}.running_var": _tensor(arrays["moving_variance"]),
            f"{prefix}.num_batches_tracked": torch.tensor(0, dtype=torch.long),
        }
    kernel = arrays["kernel"]
    if kind == "linear":
        if kernel.ndim != 2:
            raise KerasWeightsError(f"{layer!r}: Dense kernel of shape {kernel.shape}")
        return {f"{prefix}.weight": _tensor(kernel.T)}  # Keras Dense is (in, out), torch Linear (out, in)
    if kernel.ndim != 4:
        raise KerasWeightsError(f"{layer!r}: Conv2D kernel of shape {kernel.shape}")
    weight = _tensor(kernel.transpose(3, 2, 0, 1))  # Keras HWIO -> torch OIHW
    if kind == "conv":
        return {f"{prefix}.weight": weight, f"{prefix}.bias": _tensor(arrays["bias"])}
    return {f"{prefix}.conv.weight": weight}


def _check_config(config: str, model: InceptionResnetV1) -> None:
    """Check the architecture facts that the weights alone cannot show: BatchNorm epsilon and residual scales.

    Both are hard-coded in the torch network; a file that differed would convert without a shape error into a
    different function. The scales live in the Lambda layers' ``arguments`` (the Lambda body, marshalled bytecode,
    is ``x * scale``; the fixture generator checked that in Keras).
    """
    try:
        layers = json.loads(config)["config"]["layers"]
        epsilons = {
            float(layer["config"]["epsilon"]) for layer in layers if layer["class_name"] == "BatchNormalization"
        }
        scales = [float(layer["config"]["arguments"]["scale"]) for layer in layers if layer["class_name"] == "Lambda"]
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise KerasWeightsError(f"model_config is not the expected Keras model JSON: {exc!r}") from exc
    if any(not math.isclose(eps, BN_EPS) for eps in epsilons):
        raise KerasWeightsError(f"BatchNorm epsilons {sorted(epsilons)}, the torch network uses {BN_EPS}")
    # The residual blocks in forward order, as Keras lists its Lambda layers (topologically).
    blocks = [*model.repeat_1, *model.repeat_2, *model.repeat_3, model.block8]
    torch_scales = [float(block.scale) for block in blocks]
    if len(scales) != len(torch_scales) or not np.allclose(scales, torch_scales):
        raise KerasWeightsError(f"residual scales {scales} differ from the torch network's {torch_scales}")


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _texts(values: object) -> list[str]:
    """An HDF5 string-array attribute (bytes or str items) as a list of str."""
    return [_text(value) for value in np.asarray(values).ravel()]
