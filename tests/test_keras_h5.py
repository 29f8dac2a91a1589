"""The Keras FaceNet converter: name mapping and bad files (no weights needed), then Keras's own outputs.

The reference outputs in ``fixtures/keras_facenet_reference.json`` were computed by Keras itself from the same
HDF5 file, in a throwaway TensorFlow environment (``fixtures/make_keras_reference.py``); TensorFlow is not a
dependency of this project, so the test compares against stored numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.model.standardization import prewhiten
from serve_app.model.weights.files import keras_h5_path
from serve_app.model.weights.keras_h5 import (
    KerasWeightsError,
    build_keras_facenet_model,
    keras_layer_to_torch_prefix,
    load_keras_facenet_state_dict,
)

from .conftest import LFW

FIXTURE = Path(__file__).parent / "fixtures" / "keras_facenet_reference.json"
# Keras (TF 2.21, oneDNN off) vs torch on CPU: float32 sums in another order. Measured: about 2e-6 on outputs of
# magnitude ~2; a wrong layer mapping or a missing BatchNorm shows up as differences of order 1.
TOLERANCE = 1e-4


@pytest.mark.parametrize(
    ("layer", "prefix"),
    [
        ("Conv2d_1a_3x3", "conv2d_1a"),
        ("Conv2d_4b_3x3_BatchNorm", "conv2d_4b.bn"),
        ("Conv2d_2b_3x3_Activation", "conv2d_2b.relu"),
        ("MaxPool_3a_3x3", "maxpool_3a"),
        ("Block35_1_Branch_0_Conv2d_1x1", "repeat_1.0.branch0"),
        ("Block35_5_Branch_2_Conv2d_0c_3x3", "repeat_1.4.branch2.2"),
        ("Block35_2_Conv2d_1x1", "repeat_1.1.conv2d"),
        ("Block35_2_Activation", "repeat_1.1.relu"),
        ("Block17_3_Branch_1_Conv2d_0b_1x7", "repeat_2.2.branch1.1"),
        ("Block17_10_Branch_1_Conv2d_0c_7x1_BatchNorm", "repeat_2.9.branch1.2.bn"),
        ("Block8_5_Branch_1_Conv2d_0a_1x1", "repeat_3.4.branch1.0"),
        ("Block8_6_Conv2d_1x1", "block8.conv2d"),
        ("Block8_6_Branch_1_Conv2d_0c_3x1", "block8.branch1.2"),
        ("Block8_6_Branch_0_Conv2d_1x1_Activation", "block8.branch0.relu"),
        ("Mixed_6a_Branch_0_Conv2d_1a_3x3", "mixed_6a.branch0"),
        ("Mixed_6a_Branch_1_Conv2d_1a_3x3", "mixed_6a.branch1.2"),
        ("Mixed_6a_Branch_2_MaxPool_1a_3x3", "mixed_6a.branch2"),
        ("Mixed_7a_Branch_0_Conv2d_1a_3x3", "mixed_7a.branch0.1"),
        ("Mixed_7a_Branch_2_Conv2d_0b_3x3", "mixed_7a.branch2.1"),
        ("Mixed_7a_Branch_3_MaxPool_1a_3x3", "mixed_7a.branch3"),
        ("AvgPool", "avgpool_1a"),
        ("Dropout", "dropout"),
        ("Bottleneck", "last_linear"),
        ("Bottleneck_BatchNorm", "last_bn"),
    ],
)
def test_layer_name_mapping(layer: str, prefix: str) -> None:
    assert keras_layer_to_torch_prefix(layer) == prefix


@pytest.mark.parametrize(
    "layer",
    [
        "Dense_1",  # not in this architecture
        "Block35_1_Branch_3_Conv2d_1x1",  # no such branch
        "Block35_6_Conv2d_1x1",  # only 5 Block35 repeats
        "Block8_7_Conv2d_1x1",  # 5 repeats + the final block8
        "Mixed_6a_Branch_0_Conv2d_0a_1x1",  # branch 0 of Mixed_6a is a single 1a conv
        "Mixed_9a_Branch_0_Conv2d_1a_3x3",
        "Block8_6_Activation",  # the final block has no ReLU
        "Block35_1_Conv2d_1x1_BatchNorm",  # the residual projection has no BatchNorm
        "Block35_1_Concatenate",  # glue: done inside forward()
        "lambda_3",
        "add_3",
        "input_1",
    ],
)
def test_unknown_and_parameterless_layers_are_refused(layer: str) -> None:
    with pytest.raises(KerasWeightsError):
        keras_layer_to_torch_prefix(layer)


def _lambda(scale: float) -> dict[str, Any]:
    return {"class_name": "Lambda", "config": {"arguments": {"scale": scale}}}


def _write_keras_like(path: Path, layers: dict[str, dict[str, np.ndarray]], scales: list[float] | None = None) -> None:
    """A small HDF5 file laid out like a Keras model save, holding only ``layers``."""
    scales = scales if scales is not None else [0.17] * 5 + [0.1] * 10 + [0.2] * 5 + [1.0]
    config = {"class_name": "Functional", "config": {"layers": [_lambda(s) for s in scales]}}
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = json.dumps(config)
        weights = handle.create_group("model_weights")
        weights.attrs["layer_names"] = [name.encode() for name in layers]
        for name, arrays in layers.items():
            group = weights.create_group(name)
            group.attrs["weight_names"] = [f"{name}/{var}:0".encode() for var in arrays]
            for var, array in arrays.items():
                group.create_dataset(f"{name}/{var}:0", data=array)


STEM_CONV = {"kernel": np.zeros((3, 3, 3, 32), dtype=np.float32)}


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(KerasWeightsError, match="unreadable"):
        load_keras_facenet_state_dict(junk)


def test_truncated_file(tmp_path: Path) -> None:
    whole = tmp_path / "whole.h5"
    _write_keras_like(whole, {"Conv2d_4b_3x3": {"kernel": np.ones((3, 3, 192, 256), dtype=np.float32)}})
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(KerasWeightsError, match="unreadable"):
        load_keras_facenet_state_dict(truncated)


def test_hdf5_that_is_not_a_keras_model(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.create_dataset("something", data=np.zeros(3))
    with pytest.raises(KerasWeightsError, match="not a whole Keras model"):
        load_keras_facenet_state_dict(other)


def test_missing_layers(tmp_path: Path) -> None:
    partial = tmp_path / "partial.h5"
    _write_keras_like(partial, {"Conv2d_1a_3x3": STEM_CONV})
    with pytest.raises(KerasWeightsError, match="no weights for"):
        load_keras_facenet_state_dict(partial)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"Conv2d_1a_3x3": {"kernel": np.zeros((3, 3, 3, 16), dtype=np.float32)}}, "shape"),
        ({"Conv2d_1a_3x3": {**STEM_CONV, "bias": np.zeros(32, dtype=np.float32)}}, "expected"),
        ({"Conv2d_1a_3x3_BatchNorm": {"beta": np.zeros(32, dtype=np.float32)}}, "expected"),
        ({"Dense_1": {"kernel": np.zeros((1792, 128), dtype=np.float32)}}, "unexpected layer"),
        ({"AvgPool": {"kernel": np.zeros(1, dtype=np.float32)}}, "has none"),
    ],
)
def test_unexpected_layer_contents(tmp_path: Path, layers: dict[str, dict[str, np.ndarray]], message: str) -> None:
    path = tmp_path / "bad.h5"
    _write_keras_like(path, layers)
    with pytest.raises(KerasWeightsError, match=message):
        load_keras_facenet_state_dict(path)


def test_other_residual_scales_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "scales.h5"
    _write_keras_like(path, {"Conv2d_1a_3x3": STEM_CONV}, scales=[0.1] * 21)
    with pytest.raises(KerasWeightsError, match="residual scales"):
        load_keras_facenet_state_dict(path)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_keras_facenet_state_dict(tmp_path / "absent.h5")


def test_prewhiten_matches_the_numpy_recipe() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(2, 3, 8, 8))
    expected = np.stack(
        [(x - x.mean()) / max(x.std(), 1 / np.sqrt(x.size)) for x in images]  # Sandberg's facenet.prewhiten
    )
    got = prewhiten(torch.from_numpy(images).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    # A flat image has std 0: the floor keeps it finite (all zeros after centring).
    flat = prewhiten(torch.full((1, 3, 4, 4), 128.0))
    assert torch.equal(flat, torch.zeros_like(flat))
    with pytest.raises(TypeError):
        prewhiten(torch.zeros((1, 3, 4, 4), dtype=torch.uint8))
    with pytest.raises(ValueError):
        prewhiten(torch.zeros((3, 4, 4)))


def test_converted_model_matches_keras_itself(record_property: Any) -> None:
    reference = json.loads(FIXTURE.read_text())
    path = keras_h5_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == reference["weights_sha256"], "another weights file"
    images = [LFW / "images" / name for name in reference["images"]]
    for image, digest in zip(images, reference["images_sha256"], strict=True):
        assert hashlib.sha256(image.read_bytes()).hexdigest() == digest, f"{image} differs from the reference's"

    low, high = reference["recipe"]["crop"]
    crops = [np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)[low:high, low:high] for image in images]
    batch = prewhiten(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous())

    model = build_keras_facenet_model()
    result = model.load_state_dict(load_keras_facenet_state_dict(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # Keras's model ends at the bottleneck BatchNorm; facenet-pytorch's forward L2-normalises after it, so the raw
    # vectors are taken from last_bn.
    raw: list[torch.Tensor] = []
    model.last_bn.register_forward_hook(lambda _module, _inputs, output: raw.append(output))
    with torch.inference_mode():
        unit = model.eval()(batch).numpy()
    ours = raw[0].numpy()

    expected = np.asarray(reference["outputs"], dtype=np.float32)
    assert ours.shape == expected.shape == (3, 128)
    diff = float(np.abs(ours - expected).max())
    expected_unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    unit_diff = float(np.abs(unit - expected_unit).max())
    record_property("max_abs_diff_vs_keras", diff)
    record_property("max_abs_diff_vs_keras_l2_normalised", unit_diff)
    assert diff < TOLERANCE, (
        f"max |torch - keras| = {diff:.3g} on raw outputs of magnitude {np.abs(expected).max():.3g}"
    )
    assert unit_diff < TOLERANCE, f"max |torch - keras| = {unit_diff:.3g} after L2 normalisation"
    # And the embedding means something: two photos of Aaron Sorkin are closer than Sorkin and AJ Cook.
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.3
