"""LFW View 1 with the default embedder: threshold from DevTrain, accuracy on DevTest (the standard protocol)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facerec.cli.main import main
from serve_app.model.checkpoints import CHECKPOINTS, DEFAULT_CHECKPOINT

from .conftest import LFW


@pytest.mark.slow
def test_lfw_view1_devtest_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "roc.png"
    code = main(
        [
            "eval",
            "lfw",
            "--calibrate",
            str(LFW / "pairsDevTrain.txt"),
            "--pairs",
            str(LFW / "pairsDevTest.txt"),
            "--images",
            str(LFW / "images"),
            "--plot",
            str(plot),
            "--checkpoint",
            DEFAULT_CHECKPOINT,
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pairs"] == 1000 and report["images"] == 4992
    assert report["accuracy"] >= 0.99, report
    assert report["calibration_accuracy"] >= 0.99, report
    assert report["auc"] >= 0.995
    assert report["faces_missing"]["count"] <= 5
    # The threshold shipped with the checkpoint is the one DevTrain picks (the README's table).
    assert abs(report["threshold"] - CHECKPOINTS[DEFAULT_CHECKPOINT].threshold) < 0.02
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
