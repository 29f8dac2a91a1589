"""Convert the frozen CASIA-WebFace FaceNet GraphDef into a facenet-pytorch ``InceptionResnetV1`` state dict.

The file is D. Sandberg's FaceNet 20180408-102900 (Inception-ResNet-v1, 512-d embeddings) as a frozen TensorFlow
``GraphDef``, after TensorFlow's graph transforms folded every BatchNorm of the convolution trunk into its
convolution. Neither TensorFlow nor the ``protobuf`` package is a dependency of this service, so this module reads
the protobuf wire format itself; a ``GraphDef`` needs only varints, length-delimited fields and fixed-width floats.

What is read (field numbers from TensorFlow's ``graph.proto``, ``node_def.proto``, ``attr_value.proto``,
``tensor.proto`` and ``tensor_shape.proto``):

* ``GraphDef.node = 1`` (repeated ``NodeDef``); every other top-level field (versions, library) is skipped;
* ``NodeDef``: ``name = 1``, ``op = 2``, ``input = 3``, ``attr = 5`` (``map<string, AttrValue>``);
* ``AttrValue.tensor = 8`` (``TensorProto``), only for the ``value`` attribute of ``Const`` nodes;
* ``TensorProto``: ``dtype = 1``, ``tensor_shape = 2`` (``TensorShapeProto.dim = 2``, ``Dim.size = 1``),
  ``tensor_content = 4`` and the typed value lists ``float_val = 5``, ``double_val = 6``, ``int_val = 7``,
  ``int64_val = 10``, ``bool_val = 11``.

The graph is fixed to one 160x160 RGB image in NHWC layout (the batch size was constant-folded into its reshapes);
the converted torch model has no such limit. Its input is RGB standardised as ``(x - 127.5) / 128``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from facenet_pytorch import InceptionResnetV1

log = logging.getLogger(f"ray.serve.{__name__}")

__all__ = [
    "GraphDefFormatError",
    "GraphNode",
    "load_casia_state_dict",
    "read_graphdef",
    "tf_scope_to_torch_prefix",
]


class GraphDefFormatError(ValueError):
    """The bytes are not a GraphDef this reader understands, or the graph is not the expected FaceNet network."""


@dataclass(frozen=True)
class GraphNode:
    """One ``NodeDef`` of a GraphDef, reduced to what weight conversion needs.

    ``tensor`` is the decoded ``value`` attribute of a ``Const`` node and ``None`` for every other op. Arrays built
    from ``tensor_content`` are read-only views into the bytes given to :func:`read_graphdef` (no copy of a 94 MB
    file), so they keep those bytes alive.
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    tensor: npt.NDArray[np.generic] | None = None


# --------------------------------------------------------------------------------------------------------------------
# Protobuf wire format
# --------------------------------------------------------------------------------------------------------------------

_WIRE_VARINT: Final = 0
_WIRE_FIXED64: Final = 1
_WIRE_LEN: Final = 2
_WIRE_FIXED32: Final = 5

# A varint carries at most 64 bits, i.e. 10 groups of 7 bits.
_MAX_VARINT_BYTES: Final = 10

# GraphDef / NodeDef / AttrValue / TensorProto / TensorShapeProto field numbers.
_GRAPH_NODE: Final = 1
_NODE_NAME: Final = 1
_NODE_OP: Final = 2
_NODE_INPUT: Final = 3
_NODE_ATTR: Final = 5
_MAP_KEY: Final = 1
_MAP_VALUE: Final = 2
_ATTR_TENSOR: Final = 8
_TENSOR_DTYPE: Final = 1
_TENSOR_SHAPE: Final = 2
_TENSOR_CONTENT: Final = 4
_SHAPE_DIM: Final = 2
_DIM_SIZE: Final = 1

# TensorFlow DataType enum -> little-endian numpy dtype, and which typed list holds the values when
# ``tensor_content`` is absent. The fixed-width lists may be packed (one length-delimited field) or not.
_DTYPES: Final[Mapping[int, tuple[str, np.dtype[np.generic]]]] = {
    1: ("float_val", np.dtype("<f4")),
    2: ("double_val", np.dtype("<f8")),
    3: ("int_val", np.dtype("<i4")),
    4: ("int_val", np.dtype("u1")),
    5: ("int_val", np.dtype("<i2")),
    6: ("int_val", np.dtype("i1")),
    9: ("int64_val", np.dtype("<i8")),
    10: ("bool_val", np.dtype("?")),
}
# Typed list field number -> (name, wire type of one unpacked element, width in bytes; 0 means a varint).
_VALUE_FIELDS: Final[Mapping[int, tuple[str, int, int]]] = {
    5: ("float_val", _WIRE_FIXED32, 4),
    6: ("double_val", _WIRE_FIXED64, 8),
    7: ("int_val", _WIRE_VARINT, 0),
    10: ("int64_val", _WIRE_VARINT, 0),
    11: ("bool_val", _WIRE_VARINT, 0),
}
_FIXED_DTYPES: Final[Mapping[int, np.dtype[np.generic]]] = {4: np.dtype("<f4"), 8: np.dtype("<f8")}


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at ``pos``; returns ``(value, position after it)``."""
    result = 0
    for index in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise GraphDefFormatError(f"truncated varint at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            return result, pos
    raise GraphDefFormatError(f"varint longer than {_MAX_VARINT_BYTES} bytes before byte {pos}")


def _as_int64(value: int) -> int:
    """Reinterpret a decoded varint as a signed 64-bit integer (negative int32/int64 values use 10 bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Iterate over the fields of the message in ``data[start:end]``.

    Yields ``(field number, wire type, a, b)``: for a varint ``a`` is the value (and ``b`` is 0); for every other
    wire type ``data[a:b]`` is the payload. Payloads are located, never copied, so a large ``tensor_content`` costs
    nothing until it is used.
    """
    pos = start
    while pos < end:
        key, pos = _read_varint(data, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise GraphDefFormatError(f"field number 0 at byte {pos}")
        if wire_type == _WIRE_VARINT:
            value, pos = _read_varint(data, pos, end)
            yield number, wire_type, value, 0
            continue
        if wire_type == _WIRE_LEN:
            length, pos = _read_varint(data, pos, end)
            size = length
        elif wire_type == _WIRE_FIXED64:
            size = 8
        elif wire_type == _WIRE_FIXED32:
            size = 4
        else:
            # 3/4 are proto2 groups, which no TensorFlow message uses; 6/7 do not exist.
            raise GraphDefFormatError(f"unsupported wire type {wire_type} for field {number} at byte {pos}")
        if pos + size > end:
            raise GraphDefFormatError(f"field {number} at byte {pos} runs {pos + size - end} bytes past its message")
        yield number, wire_type, pos, pos + size
        pos += size


def _expect_wire(number: int, wire_type: int, expected: int, message: str) -> None:
    if wire_type != expected:
        raise GraphDefFormatError(f"{message} field {number} has wire type {wire_type}, expected {expected}")


def _text(data: bytes, start: int, end: int, what: str) -> str:
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GraphDefFormatError(f"{what} at byte {start} is not UTF-8") from exc


def _read_shape(data: bytes, start: int, end: int) -> tuple[int, ...]:
    dims: list[int] = []
    for number, wire_type, a, b in _fields(data, start, end):
        if number != _SHAPE_DIM:
            continue  # unknown_rank (3): a Const always has a known rank, checked through its sizes below.
        _expect_wire(number, wire_type, _WIRE_LEN, "TensorShapeProto")
        size = 0
        for dim_number, dim_wire, value, _ in _fields(data, a, b):
            if dim_number == _DIM_SIZE:
                _expect_wire(dim_number, dim_wire, _WIRE_VARINT, "TensorShapeProto.Dim")
                size = _as_int64(value)
        if size < 0:
            raise GraphDefFormatError(f"constant with unknown dimension {size} at byte {a}")
        dims.append(size)
    return tuple(dims)


def _read_tensor(data: bytes, start: int, end: int) -> npt.NDArray[np.generic]:
    """Decode a ``TensorProto`` into a numpy array of its shape."""
    dtype_code = 0
    shape: tuple[int, ...] = ()
    content: tuple[int, int] | None = None
    varints: dict[str, list[int]] = {}
    fixed: dict[str, list[npt.NDArray[np.generic]]] = {}
    for number, wire_type, a, b in _fields(data, start, end):
        if number == _TENSOR_DTYPE:
            _expect_wire(number, wire_type, _WIRE_VARINT, "TensorProto")
            dtype_code = a
        elif number == _TENSOR_SHAPE:
            _expect_wire(number, wire_type, _WIRE_LEN, "TensorProto")
            shape = _read_shape(data, a, b)
        elif number == _TENSOR_CONTENT:
            _expect_wire(number, wire_type, _WIRE_LEN, "TensorProto")
            content = (a, b)
        elif number in _VALUE_FIELDS:
            name, element_wire, width = _VALUE_FIELDS[number]
            if width:
                # Fixed-width values: packed (one LEN field) or one FIXED32/FIXED64 field per value.
                if wire_type not in (_WIRE_LEN, element_wire):
                    raise GraphDefFormatError(f"TensorProto {name} at byte {a} has wire type {wire_type}")
                if (b - a) % width:
                    raise GraphDefFormatError(f"packed {name} at byte {a} is not a multiple of {width} bytes")
                element = _FIXED_DTYPES[width]
                fixed.setdefault(name, []).append(np.frombuffer(data, element, (b - a) // width, a))
            elif wire_type == _WIRE_VARINT:
                varints.setdefault(name, []).append(_as_int64(a))
            else:
                _expect_wire(number, wire_type, _WIRE_LEN, "TensorProto")
                pos = a
                while pos < b:
                    value, pos = _read_varint(data, pos, b)
                    varints.setdefault(name, []).append(_as_int64(value))
    if dtype_code not in _DTYPES:
        raise GraphDefFormatError(f"constant at byte {start} has unsupported TensorFlow dtype {dtype_code}")
    value_field, dtype = _DTYPES[dtype_code]
    count = int(np.prod(shape, dtype=np.int64))
    if content is not None:
        a, b = content
        if b - a != count * dtype.itemsize:
            raise GraphDefFormatError(
                f"tensor_content at byte {a} holds {b - a} bytes; shape {shape} of {dtype} needs "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(data, dtype, count, a).reshape(shape)
    values: npt.NDArray[np.generic]
    if value_field in fixed:
        values = np.concatenate(fixed[value_field]).astype(dtype, copy=False)
    else:
        values = np.asarray(varints.get(value_field, []), dtype=np.int64).astype(dtype)
    if values.size > count:
        raise GraphDefFormatError(f"constant at byte {start} has {values.size} values for shape {shape}")
    if values.size < count:
        # TensorFlow's convention: a short list is padded with its last value (an empty one with zeros), so a
        # 512-vector of ones is stored as the single value 1.0.
        fill = values[-1] if values.size else dtype.type(0)
        values = np.concatenate([values, np.full(count - values.size, fill, dtype)])
    return values.reshape(shape)


def _read_const_value(data: bytes, start: int, end: int) -> npt.NDArray[np.generic] | None:
    """The tensor of an ``AttrValue``, or ``None`` when the attribute holds something else."""
    tensor = None
    for number, wire_type, a, b in _fields(data, start, end):
        if number == _ATTR_TENSOR:
            _expect_wire(number, wire_type, _WIRE_LEN, "AttrValue")
            tensor = _read_tensor(data, a, b)
    return tensor


def _read_node(data: bytes, start: int, end: int) -> GraphNode:
    name = op = ""
    inputs: list[str] = []
    value_span: tuple[int, int] | None = None
    for number, wire_type, a, b in _fields(data, start, end):
        if number == _NODE_NAME:
            _expect_wire(number, wire_type, _WIRE_LEN, "NodeDef")
            name = _text(data, a, b, "node name")
        elif number == _NODE_OP:
            _expect_wire(number, wire_type, _WIRE_LEN, "NodeDef")
            op = _text(data, a, b, "op name")
        elif number == _NODE_INPUT:
            _expect_wire(number, wire_type, _WIRE_LEN, "NodeDef")
            inputs.append(_text(data, a, b, "node input"))
        elif number == _NODE_ATTR:
            _expect_wire(number, wire_type, _WIRE_LEN, "NodeDef")
            key = ""
            value: tuple[int, int] | None = None
            for entry_number, entry_wire, c, d in _fields(data, a, b):
                _expect_wire(entry_number, entry_wire, _WIRE_LEN, "NodeDef.attr entry")
                if entry_number == _MAP_KEY:
                    key = _text(data, c, d, "attribute name")
                elif entry_number == _MAP_VALUE:
                    value = (c, d)
            if key == "value" and value is not None:
                value_span = value
    if not name:
        raise GraphDefFormatError(f"node at byte {start} has no name")
    tensor = None
    # Fields may come in any order, so whether "value" is a constant's tensor is decided once the op is known.
    if op == "Const":
        if value_span is None:
            raise GraphDefFormatError(f"Const node {name!r} has no value")
        tensor = _read_const_value(data, *value_span)
        if tensor is None:
            raise GraphDefFormatError(f"Const node {name!r} has a value that is not a tensor")
    return GraphNode(name=name, op=op, inputs=tuple(inputs), tensor=tensor)


def read_graphdef(data: bytes) -> list[GraphNode]:
    """Parse serialized ``GraphDef`` bytes into its nodes, in file order.

    Raises :class:`GraphDefFormatError` when the bytes are not a well-formed GraphDef (truncated or overlong
    fields, impossible wire types, a ``Const`` without a decodable tensor, ...).
    """
    nodes: list[GraphNode] = []
    for number, wire_type, a, b in _fields(data, 0, len(data)):
        if number == _GRAPH_NODE:
            _expect_wire(number, wire_type, _WIRE_LEN, "GraphDef")
            nodes.append(_read_node(data, a, b))
    return nodes


# --------------------------------------------------------------------------------------------------------------------
# TensorFlow scope -> facenet-pytorch module path
# --------------------------------------------------------------------------------------------------------------------

_ROOT: Final = "InceptionResnetV1"
_STEM = re.compile(r"Conv2d_(\d[a-z])_\d+x\d+")
_REPEATS: Final[Mapping[str, tuple[str, str]]] = {
    "Repeat": ("block35", "repeat_1"),
    "Repeat_1": ("block17", "repeat_2"),
    "Repeat_2": ("block8", "repeat_3"),
}
# The convolutions of each branch, in the order facenet-pytorch's nn.Sequential holds them. A one-convolution
# branch is a bare BasicConv2d in facenet-pytorch (``branch0``), not a Sequential (``branch0.0``).
_BRANCHES: Final[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
    "block35": {
        "Branch_0": ("Conv2d_1x1",),
        "Branch_1": ("Conv2d_0a_1x1", "Conv2d_0b_3x3"),
        "Branch_2": ("Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_0c_3x3"),
    },
    "block17": {
        "Branch_0": ("Conv2d_1x1",),
        "Branch_1": ("Conv2d_0a_1x1", "Conv2d_0b_1x7", "Conv2d_0c_7x1"),
    },
    "block8": {
        "Branch_0": ("Conv2d_1x1",),
        "Branch_1": ("Conv2d_0a_1x1", "Conv2d_0b_1x3", "Conv2d_0c_3x1"),
    },
    "mixed_6a": {
        "Branch_0": ("Conv2d_1a_3x3",),
        "Branch_1": ("Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_1a_3x3"),
    },
    "mixed_7a": {
        "Branch_0": ("Conv2d_0a_1x1", "Conv2d_1a_3x3"),
        "Branch_1": ("Conv2d_0a_1x1", "Conv2d_1a_3x3"),
        "Branch_2": ("Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_1a_3x3"),
    },
}
_SINGLE_BLOCKS: Final[Mapping[str, str]] = {"Mixed_6a": "mixed_6a", "Mixed_7a": "mixed_7a", "Block8": "block8"}


def _block_prefix(parts: list[str], scope: str) -> tuple[str, str, list[str]]:
    """Split a block scope into (torch prefix, block kind, the parts below the block)."""
    head = parts[0]
    if head in _SINGLE_BLOCKS:
        kind = _SINGLE_BLOCKS[head]
        return kind, kind, parts[1:]
    if head in _REPEATS and len(parts) >= 2:
        kind, container = _REPEATS[head]
        match = re.fullmatch(rf"{kind}_([1-9]\d*)", parts[1])
        if match:
            return f"{container}.{int(match.group(1)) - 1}", kind, parts[2:]
    raise GraphDefFormatError(f"no facenet-pytorch module for TensorFlow scope {scope!r}")


def tf_scope_to_torch_prefix(scope: str) -> str:
    """Map a TensorFlow variable scope of Inception-ResNet-v1 to the facenet-pytorch module path it becomes.

    The leading ``InceptionResnetV1/`` is optional. Examples::

        InceptionResnetV1/Conv2d_4b_3x3                          -> conv2d_4b
        InceptionResnetV1/Repeat_1/block17_3/Branch_1/Conv2d_0b_1x7 -> repeat_2.2.branch1.1
        InceptionResnetV1/Mixed_6a/Branch_0/Conv2d_1a_3x3        -> mixed_6a.branch0
        InceptionResnetV1/Block8/Conv2d_1x1                      -> block8.conv2d
        InceptionResnetV1/Bottleneck                             -> last_linear
        InceptionResnetV1/Bottleneck/BatchNorm                   -> last_bn

    Blocks (``Repeat/block35_1``, ``Mixed_7a``, ...) map to the block module itself. Raises
    :class:`GraphDefFormatError` for a scope that has no counterpart in facenet-pytorch's model.
    """
    parts = scope.split("/")
    if parts[0] == _ROOT:
        parts = parts[1:]
    if not parts or not all(parts):
        raise GraphDefFormatError(f"no facenet-pytorch module for TensorFlow scope {scope!r}")
    if len(parts) == 1 and (stem := _STEM.fullmatch(parts[0])):
        return f"conv2d_{stem.group(1)}"
    if parts[0] == "Bottleneck" and len(parts) <= 2:
        if len(parts) == 1:
            return "last_linear"
        if parts[1] == "BatchNorm":
            return "last_bn"
        raise GraphDefFormatError(f"no facenet-pytorch module for TensorFlow scope {scope!r}")
    prefix, kind, rest = _block_prefix(parts, scope)
    if not rest:
        return prefix
    if rest == ["Conv2d_1x1"] and kind not in ("mixed_6a", "mixed_7a"):
        return f"{prefix}.conv2d"
    if len(rest) == 2 and rest[0] in _BRANCHES[kind]:
        convs = _BRANCHES[kind][rest[0]]
        if rest[1] in convs:
            branch = f"{prefix}.branch{rest[0].removeprefix('Branch_')}"
            return branch if len(convs) == 1 else f"{branch}.{convs.index(rest[1])}"
    raise GraphDefFormatError(f"no facenet-pytorch module for TensorFlow scope {scope!r}")


# --------------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------------

# facenet-pytorch's BatchNorm eps (TensorFlow's slim default for this network).
_BN_EPS: Final = 1e-3
# graph_transforms' fold_batch_norms names the bias that replaces a folded BatchNorm "<conv>/Conv2D_bn_offset".
_BN_OFFSET_SUFFIX: Final = "_bn_offset"
# Ops that pass a constant through unchanged in an inference graph (``Switch`` is a cond's is_training fork).
_PASS_THROUGH_OPS: Final = frozenset({"Identity", "Switch"})
_BATCH_NORM_OPS: Final = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})
_BLOCK_SCALE = re.compile(rf"{_ROOT}/((?:Repeat(?:_\d+)?/block\d+_\d+)|Block8)/mul")


def _source(name: str) -> str:
    """The producing node of an input reference (drops the ``^`` of control inputs and the ``:0`` output index)."""
    name = name.removeprefix("^")
    node, sep, index = name.rpartition(":")
    return node if sep and index.isdigit() else name


class _Graph:
    """Name and consumer lookups over the nodes of one GraphDef."""

    def __init__(self, nodes: list[GraphNode]) -> None:
        self.nodes = nodes
        self.by_name: dict[str, GraphNode] = {}
        self.consumers: dict[str, list[GraphNode]] = {}
        for node in nodes:
            if node.name in self.by_name:
                raise GraphDefFormatError(f"duplicate node name {node.name!r}")
            self.by_name[node.name] = node
            for ref in node.inputs:
                self.consumers.setdefault(_source(ref), []).append(node)

    def const(self, ref: str) -> tuple[str, npt.NDArray[np.generic]]:
        """Name and tensor of the ``Const`` node behind an input reference, following Identity/Switch nodes."""
        seen: set[str] = set()
        name = _source(ref)
        while True:
            node = self.by_name.get(name)
            if node is None:
                raise GraphDefFormatError(f"input {ref!r} refers to missing node {name!r}")
            if node.op == "Const" and node.tensor is not None:
                return node.name, node.tensor
            if node.op not in _PASS_THROUGH_OPS or not node.inputs or name in seen:
                raise GraphDefFormatError(f"input {ref!r} is produced by {node.op} {name!r}, not by a constant")
            seen.add(name)
            name = _source(node.inputs[0])

    def single(self, nodes: list[GraphNode], what: str) -> GraphNode:
        if len(nodes) != 1:
            raise GraphDefFormatError(f"expected exactly one {what}, found {len(nodes)}")
        return nodes[0]


def _float_tensor(array: npt.NDArray[np.generic]) -> torch.Tensor:
    # A copy, in native byte order: the arrays are read-only views into the file's bytes, which torch cannot own.
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))


def _convert(graph: _Graph) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        if key in state:
            raise GraphDefFormatError(f"two TensorFlow layers map to {key!r}")
        state[key] = value

    for conv in (node for node in graph.nodes if node.op == "Conv2D"):
        if len(conv.inputs) != 2:
            raise GraphDefFormatError(f"Conv2D {conv.name!r} has {len(conv.inputs)} inputs")
        prefix = tf_scope_to_torch_prefix(conv.name.rpartition("/")[0])
        _, kernel = graph.const(conv.inputs[1])
        if kernel.ndim != 4:
            raise GraphDefFormatError(f"kernel of {conv.name!r} has shape {kernel.shape}, expected HWIO")
        weight = _float_tensor(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
        bias_add = graph.single(
            [node for node in graph.consumers.get(conv.name, []) if node.op == "BiasAdd"], f"BiasAdd after {conv.name}"
        )
        bias_name, bias_array = graph.const(bias_add.inputs[1])
        bias = _float_tensor(bias_array)
        if bias_name.endswith(_BN_OFFSET_SUFFIX):
            # BatchNorm was folded into the kernel and this offset; facenet-pytorch's BasicConv2d still applies its
            # BatchNorm, so make that the identity plus the offset: (x - 0) / sqrt((1 - eps) + eps) * 1 + offset.
            put(f"{prefix}.conv.weight", weight)
            put(f"{prefix}.bn.weight", torch.ones_like(bias))
            put(f"{prefix}.bn.bias", bias)
            put(f"{prefix}.bn.running_mean", torch.zeros_like(bias))
            put(f"{prefix}.bn.running_var", torch.full_like(bias, 1.0 - _BN_EPS))
            put(f"{prefix}.bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            # The block "up" projections (Conv2d_1x1) are plain biased convolutions in both frameworks.
            put(f"{prefix}.weight", weight)
            put(f"{prefix}.bias", bias)

    matmul = graph.single(
        [node for node in graph.nodes if node.op == "MatMul" and node.name.startswith(f"{_ROOT}/Bottleneck/")],
        "Bottleneck MatMul",
    )
    _, linear = graph.const(matmul.inputs[1])
    put("last_linear.weight", _float_tensor(linear.T))  # TensorFlow's (in, out) -> torch's (out, in)

    batch_norm = graph.single(
        [node for node in graph.nodes if node.op in _BATCH_NORM_OPS and node.name.startswith(f"{_ROOT}/Bottleneck/")],
        "Bottleneck batch norm",
    )
    if len(batch_norm.inputs) < 5:
        raise GraphDefFormatError(f"{batch_norm.name!r} has {len(batch_norm.inputs)} inputs, expected 5")
    # FusedBatchNorm's inputs are (x, scale, offset, mean, variance).
    for key, ref in zip(("weight", "bias", "running_mean", "running_var"), batch_norm.inputs[1:5], strict=True):
        _, tensor = graph.const(ref)
        put(f"last_bn.{key}", _float_tensor(tensor))
    put("last_bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return state


def _check_against_model(graph: _Graph, state: Mapping[str, torch.Tensor]) -> None:
    """Compare keys, shapes and residual scales with facenet-pytorch's model, so a wrong graph fails here.

    The model is built on the meta device: only its structure is needed, not 23M randomly initialised weights.
    """
    with torch.device("meta"):
        model = InceptionResnetV1(pretrained=None, classify=False)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or extra or misshaped:
        raise GraphDefFormatError(
            f"graph does not match InceptionResnetV1: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {extra[:5]} ({len(extra)}), mis-shaped {misshaped[:5]} ({len(misshaped)})"
        )
    # Residual scales are hard-coded in facenet-pytorch's blocks, not weights; a graph with others would convert
    # without error and then compute different embeddings.
    checked: set[str] = set()
    for node in graph.nodes:
        match = _BLOCK_SCALE.fullmatch(node.name)
        if node.op != "Mul" or match is None:
            continue
        constants = [graph.by_name.get(_source(ref)) for ref in node.inputs]
        scales = [c.tensor for c in constants if c is not None and c.op == "Const" and c.tensor is not None]
        if len(scales) != 1 or scales[0].size != 1:
            raise GraphDefFormatError(f"residual scale {node.name!r} is not a scalar constant")
        prefix = tf_scope_to_torch_prefix(match.group(1))
        expected_scale = float(getattr(model.get_submodule(prefix), "scale", float("nan")))
        if not np.isclose(float(scales[0].item()), expected_scale, rtol=1e-6):
            raise GraphDefFormatError(
                f"residual scale {node.name!r} is {scales[0].item()}, facenet-pytorch uses {expected_scale}"
            )
        checked.add(prefix)
    blocks = {name for name, module in model.named_modules() if hasattr(module, "scale")}
    if checked != blocks:
        raise GraphDefFormatError(f"no residual scale found in the graph for {sorted(blocks - checked)}")


def load_casia_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read the frozen GraphDef at ``path`` and return a complete ``InceptionResnetV1`` state dict.

    The result loads with ``InceptionResnetV1(pretrained=None, classify=False).load_state_dict(sd, strict=True)``
    and, in eval mode on ``(x - 127.5) / 128`` standardised 160x160 RGB NCHW crops, reproduces the graph's
    ``embeddings`` output. Raises :class:`GraphDefFormatError` when the file is not that network.
    """
    started = time.perf_counter()
    graph = _Graph(read_graphdef(path.read_bytes()))
    state = _convert(graph)
    _check_against_model(graph, state)
    log.info(
        "converted %s (%d nodes) into %d tensors in %.2f s",
        path,
        len(graph.nodes),
        len(state),
        time.perf_counter() - started,
    )
    return state
