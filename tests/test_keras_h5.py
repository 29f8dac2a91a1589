"""The Keras FaceNet converter: name mapping (no model), bad files, and Keras's own outputs as the reference."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize(
    ("layer", "prefix"),
    [
        ("Conv2d_1a_3x3", "conv2d_1a"),
        ("Conv2d_4b_3x3_BatchNorm", "conv2d_4b"),
        ("Block35_1_Branch_0_Conv2d_1x1", "repeat_1.0.branch0"),
        ("Block35_5_Branch_2_Conv2d_0c_3x3", "repeat_1.4.branch2.2"),
        ("Block35_2_Conv2d_1x1", "repeat_1.1.conv2d"),
        ("Block17_3_Branch_1_Conv2d_0b_1x7", "repeat_2.2.branch1.1"),
        ("Block17_10_Branch_1_Conv2d_0c_7x1_BatchNorm", "repeat_2.9.branch1.2"),
        ("Block8_5_Branch_1_Conv2d_0a_1x1", "repeat_3.4.branch1.0"),
        ("Block8_6_Conv2d_1x1", "block8.conv2d"),
        ("Block8_6_Branch_1_Conv2d_0c_3x1", "block8.branch1.2"),
        ("Mixed_6a_Branch_0_Conv2d_1a_3x3", "mixed_6a.branch0"),
        ("Mixed_6a_Branch_1_Conv2d_1a_3x3", "mixed_6a.branch1.2"),
        ("Mixed_7a_Branch_0_Conv2d_1a_3x3", "mixed_7a.branch0.1"),
        ("Mixed_7a_Branch_2_Conv2d_0b_3x3", "mixed_7a.branch2.1"),
        ("Bottleneck", "last_linear"),
        ("Bottleneck_BatchNorm", "last_bn"),
    ],
)
def test_layer_name_mapping(layer: str, prefix: str) -> None:
    assert keras_layer_to_torch_prefix(layer) == prefix


@pytest.mark.parametrize("layer", ["Dense_1", "Block35_1_Branch_3_Conv2d_1x1", "Mixed_9a_Branch_0_Conv2d_1a_3x3"])
def test_unknown_layers_are_refused(layer: str) -> None:
    with pytest.raises(KerasWeightsError):
        keras_layer_to_torch_prefix(layer)


def test_bad_files_raise_keras_weights_error(tmp_path: Path) -> None:
    not_h5 = tmp_path / "junk.h5"
    not_h5.write_bytes(b"\x00" * 64)
    with pytest.raises(KerasWeightsError):
        load_keras_facenet_state_dict(not_h5)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.create_dataset("something", data=np.zeros(3))
    with pytest.raises(KerasWeightsError):
        load_keras_facenet_state_dict(other)


def test_converted_model_matches_keras_itself() -> None:
    reference = json.loads(FIXTURE.read_text())
    low, high = reference["crop"]
    crops = [
        np.asarray(Image.open(LFW / "images" / name).convert("RGB"), dtype=np.float32)[low:high, low:high]
        for name in reference["images"]
    ]
    batch = prewhiten(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous())
    model = build_keras_facenet_model()
    model.load_state_dict(load_keras_facenet_state_dict(keras_h5_path()), strict=True)
    # Keras's model ends at the bottleneck BatchNorm; facenet-pytorch's forward L2-normalises after it.
    raw: list[torch.Tensor] = []
    model.last_bn.register_forward_hook(lambda _module, _inputs, output: raw.append(output))
    with torch.inference_mode():
        unit = model.eval()(batch).numpy()
    ours = raw[0].numpy()
    expected = np.asarray(reference["outputs"], dtype=np.float32)
    assert ours.shape == expected.shape == (3, 128)
    assert float(np.abs(ours - expected).max()) < 1e-4
    expected_unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    assert float(np.abs(unit - expected_unit).max()) < 1e-5
    # And the embedding means something: two photos of Aaron Sorkin are closer than Sorkin and AJ Cook.
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.3
