"""Tests for the GraphDef reader and the CASIA-WebFace FaceNet conversion.

The reference test compares the converted torch model with OpenCV's own TensorFlow importer running the same frozen
graph, on real LFW faces read from the shared dataset directory (never copied into the repository).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import torch
from facenet_pytorch import InceptionResnetV1

from serve_app.model.weights.casia_graphdef import (
    GraphDefFormatError,
    GraphNode,
    load_casia_state_dict,
    read_graphdef,
    tf_scope_to_torch_prefix,
)
from serve_app.model.weights.files import casia_graph_path

LFW_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lfw-view1" / "images"
# Two photos of one person and one of another, so the embeddings can also be sanity-checked for identity.
FACES = ("Aaron_Sorkin/Aaron_Sorkin_0001.jpg", "Aaron_Sorkin/Aaron_Sorkin_0002.jpg", "AJ_Cook/AJ_Cook_0001.jpg")
PRE_NORM_LAYER = "InceptionResnetV1/Bottleneck/BatchNorm/Reshape_1"


# ---------------------------------------------------------------------------------------------------------------------
# A minimal protobuf encoder, so the reader is tested against bytes whose layout the test states explicitly.
# ---------------------------------------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers are encoded as their 64-bit two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def string(number: int, text: str) -> bytes:
    return length_delimited(number, text.encode())


def shape_proto(*dims: int) -> bytes:
    return b"".join(length_delimited(2, key(1, 0) + varint(d)) for d in dims)


def const_node(name: str, tensor: bytes) -> bytes:
    attr_value = length_delimited(8, tensor)
    dtype_attr = length_delimited(5, string(1, "dtype") + length_delimited(2, key(6, 0) + varint(1)))
    value_attr = length_delimited(5, string(1, "value") + length_delimited(2, attr_value))
    return length_delimited(1, string(1, name) + string(2, "Const") + dtype_attr + value_attr)


def float_tensor(dims: tuple[int, ...], body: bytes) -> bytes:
    return key(1, 0) + varint(1) + length_delimited(2, shape_proto(*dims)) + body


KERNEL = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5


def tiny_graph(float_val: bytes) -> bytes:
    """GraphDef with a Const from tensor_content and a Const from float_val, plus a skipped ``versions`` field."""
    content = float_tensor((2, 3), length_delimited(4, KERNEL.astype("<f4").tobytes()))
    versions = length_delimited(4, key(1, 0) + varint(27))
    return const_node("w", content) + versions + const_node("b", float_tensor((4,), float_val))


def packed_floats(*values: float) -> bytes:
    return length_delimited(5, struct.pack(f"<{len(values)}f", *values))


def unpacked_floats(*values: float) -> bytes:
    return b"".join(key(5, 5) + struct.pack("<f", v) for v in values)


# ---------------------------------------------------------------------------------------------------------------------
# Unit tests: wire reader and scope mapping
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("float_val", "expected"),
    [
        (packed_floats(1.0, -2.0, 0.5, 3.0), [1.0, -2.0, 0.5, 3.0]),
        (unpacked_floats(1.0, -2.0, 0.5, 3.0), [1.0, -2.0, 0.5, 3.0]),
        # TensorFlow pads a short list with its last value: a constant vector is stored as one value.
        (packed_floats(0.25), [0.25] * 4),
        (packed_floats(1.0) + unpacked_floats(2.0), [1.0, 2.0, 2.0, 2.0]),
        (b"", [0.0] * 4),
    ],
    ids=["packed", "unpacked", "repeated-last", "mixed", "empty"],
)
def test_read_graphdef_decodes_tensor_content_and_float_val(float_val: bytes, expected: list[float]) -> None:
    nodes = read_graphdef(tiny_graph(float_val))

    assert [(n.name, n.op, n.inputs) for n in nodes] == [("w", "Const", ()), ("b", "Const", ())]
    weights, bias = (n.tensor for n in nodes)
    assert weights is not None and bias is not None
    assert weights.dtype == np.float32 and weights.shape == (2, 3)
    np.testing.assert_array_equal(weights, KERNEL)
    assert bias.dtype == np.float32 and bias.shape == (4,)
    np.testing.assert_array_equal(bias, np.asarray(expected, dtype=np.float32))


def test_read_graphdef_reads_ops_inputs_and_int_constants() -> None:
    axis = key(1, 0) + varint(3) + length_delimited(7, varint(-1))  # DT_INT32 scalar, packed int_val, negative
    node = length_delimited(
        1, string(1, "net/add") + string(2, "AddV2") + string(3, "a:0") + string(3, "^b") + string(4, "/cpu:0")
    )
    # Field order is free in protobuf: here the op comes after the attribute that holds the tensor.
    reordered = length_delimited(
        1,
        string(1, "axis")
        + length_delimited(5, string(1, "value") + length_delimited(2, length_delimited(8, axis)))
        + string(2, "Const"),
    )

    nodes = read_graphdef(node + reordered)

    assert nodes[0] == GraphNode(name="net/add", op="AddV2", inputs=("a:0", "^b"), tensor=None)
    assert nodes[1].op == "Const" and nodes[1].tensor is not None
    assert nodes[1].tensor.dtype == np.int32 and nodes[1].tensor.shape == () and int(nodes[1].tensor) == -1


def test_read_graphdef_empty_input_is_an_empty_graph() -> None:
    assert read_graphdef(b"") == []


GOOD = tiny_graph(packed_floats(1.0))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(GOOD[:-1], id="truncated"),
        pytest.param(b"\x0a\x80", id="truncated-varint"),
        pytest.param(b"\x0a" + b"\xff" * 11, id="overlong-varint"),
        pytest.param(b"\x0a\x05ab", id="length-past-end"),
        pytest.param(b"\x0b\x0c", id="group-wire-type"),
        pytest.param(b"\x0e", id="invalid-wire-type"),
        pytest.param(b"\x02\x00", id="field-number-0"),
        pytest.param(key(1, 0) + varint(5), id="node-not-a-message"),
        pytest.param(length_delimited(1, key(1, 0) + varint(7)), id="name-not-a-string"),
        pytest.param(length_delimited(1, length_delimited(1, b"\xff\xfe")), id="name-not-utf8"),
        pytest.param(length_delimited(1, string(2, "Const")), id="no-name"),
        pytest.param(length_delimited(1, string(1, "c") + string(2, "Const")), id="const-without-value"),
        pytest.param(
            const_node("c", float_tensor((2, 3), length_delimited(4, b"\x00" * 20))), id="content-size-mismatch"
        ),
        pytest.param(const_node("c", float_tensor((2,), packed_floats(1.0, 2.0, 3.0))), id="too-many-values"),
        pytest.param(const_node("c", float_tensor((2,), length_delimited(5, b"\x00" * 6))), id="ragged-packed"),
        pytest.param(const_node("c", key(1, 0) + varint(7)), id="string-dtype"),
        pytest.param(const_node("c", float_tensor((-1,), b"")), id="unknown-dim"),
    ],
)
def test_read_graphdef_rejects_malformed_bytes(data: bytes) -> None:
    with pytest.raises(GraphDefFormatError):
        read_graphdef(data)


def test_graphdef_format_error_is_a_value_error() -> None:
    assert issubclass(GraphDefFormatError, ValueError)


@pytest.mark.parametrize(
    ("scope", "prefix"),
    [
        ("InceptionResnetV1/Conv2d_1a_3x3", "conv2d_1a"),
        ("InceptionResnetV1/Conv2d_3b_1x1", "conv2d_3b"),
        ("InceptionResnetV1/Conv2d_4b_3x3", "conv2d_4b"),
        ("InceptionResnetV1/Repeat/block35_1/Branch_0/Conv2d_1x1", "repeat_1.0.branch0"),
        ("InceptionResnetV1/Repeat/block35_5/Branch_2/Conv2d_0c_3x3", "repeat_1.4.branch2.2"),
        ("InceptionResnetV1/Repeat/block35_2/Conv2d_1x1", "repeat_1.1.conv2d"),
        ("InceptionResnetV1/Repeat_1/block17_3/Branch_1/Conv2d_0b_1x7", "repeat_2.2.branch1.1"),
        ("InceptionResnetV1/Repeat_1/block17_10/Conv2d_1x1", "repeat_2.9.conv2d"),
        ("InceptionResnetV1/Repeat_2/block8_5/Branch_1/Conv2d_0c_3x1", "repeat_3.4.branch1.2"),
        ("InceptionResnetV1/Mixed_6a/Branch_0/Conv2d_1a_3x3", "mixed_6a.branch0"),
        ("InceptionResnetV1/Mixed_6a/Branch_1/Conv2d_1a_3x3", "mixed_6a.branch1.2"),
        ("InceptionResnetV1/Mixed_7a/Branch_0/Conv2d_1a_3x3", "mixed_7a.branch0.1"),
        ("InceptionResnetV1/Mixed_7a/Branch_2/Conv2d_0b_3x3", "mixed_7a.branch2.1"),
        ("InceptionResnetV1/Block8/Branch_1/Conv2d_0a_1x1", "block8.branch1.0"),
        ("InceptionResnetV1/Block8/Conv2d_1x1", "block8.conv2d"),
        ("InceptionResnetV1/Repeat_1/block17_4", "repeat_2.3"),
        ("InceptionResnetV1/Bottleneck", "last_linear"),
        ("InceptionResnetV1/Bottleneck/BatchNorm", "last_bn"),
        ("Repeat_2/block8_1/Branch_0/Conv2d_1x1", "repeat_3.0.branch0"),  # the root scope is optional
    ],
)
def test_tf_scope_to_torch_prefix(scope: str, prefix: str) -> None:
    assert tf_scope_to_torch_prefix(scope) == prefix


@pytest.mark.parametrize(
    "scope",
    [
        "",
        "InceptionResnetV1",
        "InceptionResnetV1/Logits",
        "InceptionResnetV1/Repeat/block17_1/Conv2d_1x1",  # block17 lives in Repeat_1
        "InceptionResnetV1/Repeat/block35_0/Conv2d_1x1",  # blocks count from 1
        "InceptionResnetV1/Repeat/block35_1/Branch_3/Conv2d_1x1",
        "InceptionResnetV1/Repeat_1/block17_1/Branch_1/Conv2d_0b_3x3",
        "InceptionResnetV1/Mixed_6a/Conv2d_1x1",
        "InceptionResnetV1/Mixed_7a/Branch_3/MaxPool_1a_3x3",
        "InceptionResnetV1/Bottleneck/weights",
        "InceptionResnetV1//Conv2d_1a_3x3",
    ],
)
def test_tf_scope_to_torch_prefix_rejects_unknown_scopes(scope: str) -> None:
    with pytest.raises(GraphDefFormatError):
        tf_scope_to_torch_prefix(scope)


def test_load_rejects_graphs_that_are_not_facenet(tmp_path: Path) -> None:
    not_facenet = tmp_path / "tiny.pb"
    not_facenet.write_bytes(GOOD)
    with pytest.raises(GraphDefFormatError):
        load_casia_state_dict(not_facenet)

    truncated = tmp_path / "truncated.pb"
    with casia_graph_path().open("rb") as handle:
        truncated.write_bytes(handle.read(1 << 16))
    with pytest.raises(GraphDefFormatError):
        load_casia_state_dict(truncated)


# ---------------------------------------------------------------------------------------------------------------------
# Reference test: converted torch model vs OpenCV running the frozen graph
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_path() -> Path:
    return casia_graph_path()


@pytest.fixture(scope="module")
def faces() -> npt.NDArray[np.float32]:
    """The LFW test faces as one NCHW float32 batch: central 160x160 crop, RGB, ``(x - 127.5) / 128``."""
    assert LFW_IMAGES.is_dir(), f"LFW images not found at {LFW_IMAGES}"
    crops = []
    for name in FACES:
        bgr = cv2.imread(str(LFW_IMAGES / name), cv2.IMREAD_COLOR)
        assert bgr is not None and bgr.shape == (250, 250, 3), name
        rgb = cv2.cvtColor(bgr[45:205, 45:205], cv2.COLOR_BGR2RGB)
        crops.append((rgb.astype(np.float32) - 127.5) / 128.0)
    return np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def torch_outputs(graph_path: Path, faces: npt.NDArray[np.float32]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(L2-normalised embeddings, last_bn output before normalisation) of the converted model, whole batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = InceptionResnetV1(pretrained=None, classify=False).eval()
        model.load_state_dict(load_casia_state_dict(graph_path), strict=True)
        captured: list[torch.Tensor] = []
        hook = model.last_bn.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        with torch.inference_mode():
            embeddings = model(torch.from_numpy(faces))
        hook.remove()
        yield embeddings.numpy(), captured[0].numpy()
    finally:
        torch.set_num_threads(threads)


def test_graph_has_a_single_nhwc_input_and_no_phase_train(graph_path: Path) -> None:
    nodes = read_graphdef(graph_path.read_bytes())
    placeholders = [n.name for n in nodes if n.op == "Placeholder"]
    # The frozen graph was stripped for inference: no phase_train switch, BatchNorm folded into the convolutions.
    assert placeholders == ["input"]
    assert not any("phase_train" in n.name for n in nodes)
    assert nodes[-1].name == "embeddings"


def test_converted_model_matches_opencv_on_lfw_faces(
    graph_path: Path, faces: npt.NDArray[np.float32], torch_outputs: tuple[np.ndarray, np.ndarray]
) -> None:
    embeddings, pre_norm = torch_outputs
    net = cv2.dnn.readNetFromTensorflow(str(graph_path))
    # The graph's batch size is constant-folded to 1, so OpenCV runs one face at a time. OpenCV takes NCHW blobs
    # and converts them to the graph's NHWC layout itself.
    for index in range(len(FACES)):
        blob = faces[index : index + 1]
        net.setInput(blob)
        reference = net.forward("embeddings").reshape(-1)
        net.setInput(blob)
        reference_pre_norm = net.forward(PRE_NORM_LAYER).reshape(-1)

        assert np.abs(embeddings[index] - reference).max() < 1e-4, FACES[index]
        cosine = float(embeddings[index] @ reference / (np.linalg.norm(embeddings[index]) * np.linalg.norm(reference)))
        assert cosine > 0.9999, FACES[index]
        assert np.abs(pre_norm[index] - reference_pre_norm).max() < 1e-4, FACES[index]

    # Not a reference check, a sanity one: two photos of one person are closer than photos of two people.
    assert embeddings[0] @ embeddings[1] > embeddings[0] @ embeddings[2] + 0.3
