"""Checkpoint selection: registry names, local .pt state dicts, and clear errors for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from facenet_pytorch import InceptionResnetV1

from serve_app.model.checkpoints import CHECKPOINTS, DEFAULT_CHECKPOINT, UnknownCheckpointError, resolve_checkpoint
from serve_app.model.embedder import Embedder


def test_default_is_the_measured_best() -> None:
    assert DEFAULT_CHECKPOINT == "facenet-keras-128"
    assert resolve_checkpoint(DEFAULT_CHECKPOINT) is CHECKPOINTS[DEFAULT_CHECKPOINT]
    assert CHECKPOINTS["facenet-keras-128"].threshold_for(flip=True) != CHECKPOINTS["facenet-keras-128"].threshold


def test_local_state_dict_is_accepted_with_its_own_model_id(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "mine.pt"
    torch.save(InceptionResnetV1(classify=False).state_dict(), path)
    checkpoint = resolve_checkpoint(str(path), threshold=0.5)
    assert checkpoint.dim == 512 and checkpoint.threshold == 0.5
    assert checkpoint.model_id.startswith("pt-") and checkpoint.model_id == resolve_checkpoint(str(path)).model_id
    vectors = Embedder(checkpoint, max_batch=2).embed(torch.rand(3, 3, 160, 160) * 255)
    assert vectors.shape == (3, 512)


def test_other_files_and_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownCheckpointError, match="unknown checkpoint"):
        resolve_checkpoint("resnet-9000")
    not_a_model = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, not_a_model)
    with pytest.raises(UnknownCheckpointError, match="not an InceptionResnetV1"):
        resolve_checkpoint(str(not_a_model))


def test_a_state_dict_is_read_once_per_version_of_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model id and the threshold are asked often (settings, every replica): the file is read and hashed once,
    and again only when it changes."""
    import os

    from serve_app.settings import RecognitionConfig

    path = tmp_path / "mine.pt"
    torch.save({"last_linear.weight": torch.zeros(128, 1792)}, path)
    loads: list[Path] = []
    real_load = torch.load

    def counting_load(target: Path, *args: object, **kwargs: object) -> object:
        loads.append(Path(target))
        return real_load(target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", counting_load)  # the module calls torch.load through the torch module
    settings = RecognitionConfig(checkpoint=str(path), false_accept_rate=None)
    first = settings.model_id
    assert settings.model_id == first and settings.verification_threshold == 0.4 and settings.model_id == first
    assert resolve_checkpoint(str(path)).dim == 128
    assert len(loads) == 1
    torch.save({"last_linear.weight": torch.ones(64, 1792)}, path)
    os.utime(path, ns=(1, 1))  # a new version of the file: a new modification time
    assert resolve_checkpoint(str(path)).dim == 64 and settings.model_id != first
    assert len(loads) == 2
