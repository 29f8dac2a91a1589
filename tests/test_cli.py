"""The ``facerec`` command line on real photos: enrol, recognise (JSON lines), verify, gallery tools."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from facerec.cli.main import main

from .conftest import LFW, SCENES


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, object]]]:
    code = main(list(argv))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return code, [json.loads(line) for line in lines]


def test_enroll_then_recognize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gallery = tmp_path / "gallery"
    code, (summary,) = run(capsys, "enroll", "--gallery", str(gallery), str(SCENES / "knn" / "train"))
    assert code == 0
    assert summary["enrolled_faces"] == 9 and summary["refused_photos"] == 0
    # One snapshot per model, named by the model's id (the store the service uses has the same layout).
    assert [p.name for p in (gallery / "models").iterdir()] == [f"{KERAS}.npz"]

    images = [SCENES / "knn" / "test" / "obama1.jpg", SCENES / "knn" / "test" / "kit_with_rose.jpg"]
    code, results = run(capsys, "recognize", "--gallery", str(gallery), *map(str, images))
    assert code == 0 and len(results) == 2
    assert results[0]["name"] == "obama"
    faces = results[1]["faces"]
    assert isinstance(faces, list)
    assert sorted(f["name"] for f in faces) == ["kit_harington", "rose_leslie"]

    code, (shown,) = run(capsys, "gallery", "show", "--gallery", str(gallery), "--chips", str(tmp_path / "chips"))
    assert shown["faces"] == 9 and shown["people"]["obama"] == 2  # type: ignore[index]
    # Every enrolled face keeps the aligned crop it was embedded from; show --chips exports them by person.
    assert shown["faces_with_chips"] == 9 and "faces_without_chips" not in shown
    exported = sorted((tmp_path / "chips").glob("*/*.jpg"))
    assert len(exported) == 9 and len(list((tmp_path / "chips" / "obama").iterdir())) == 2
    with Image.open(exported[0]) as chip:
        assert chip.format == "JPEG" and chip.size == (160, 160)


KERAS = "facenet-keras-ms-celeb-128-v1"
CASIA = "facenet-casia-webface-512-20180408"


def test_reembed_switches_the_model_keeping_every_face_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gallery = tmp_path / "gallery"
    assert run(capsys, "enroll", "--gallery", str(gallery), str(SCENES / "knn" / "train"))[0] == 0
    _, (before,) = run(capsys, "gallery", "show", "--gallery", str(gallery))

    code, (report,) = run(capsys, "gallery", "reembed", "--gallery", str(gallery), "--checkpoint", "casia-webface-512")
    assert code == 0
    assert report["source_model"] == KERAS and report["target_model"] == CASIA
    assert report["embedded"] == 9 and report["without_chip"] == [] and report["target_threshold"] == 0.35
    # Resumable and idempotent: a second run finds every face embedded already.
    code, (again,) = run(capsys, "gallery", "reembed", "--gallery", str(gallery), "--checkpoint", "casia-webface-512")
    assert code == 0 and again["embedded"] == 0 and again["already"] == 9

    assert run(capsys, "gallery", "show", "--gallery", str(gallery))[0] == 2  # two snapshots: which one?
    _, (after,) = run(capsys, "gallery", "show", "--gallery", str(gallery), "--model", CASIA)
    assert after["model_id"] == CASIA and after["dim"] == 512 and after["people"] == before["people"]
    assert sorted(s["model_id"] for s in after["snapshots"]) == [CASIA, KERAS]  # type: ignore[attr-defined]

    photo = str(SCENES / "knn" / "test" / "obama1.jpg")
    for checkpoint in ("facenet-keras-128", "casia-webface-512"):
        code, (result,) = run(capsys, "recognize", "--gallery", str(gallery), "--checkpoint", checkpoint, photo)
        assert code == 0 and result["name"] == "obama" and result["model_id"] in (KERAS, CASIA)

    assert run(capsys, "gallery", "drop", "--gallery", str(gallery), "--model", KERAS)[0] == 0
    _, (only,) = run(capsys, "gallery", "show", "--gallery", str(gallery))
    assert only["model_id"] == CASIA and only["faces"] == 9


def test_recognize_reports_bad_files_and_keeps_going(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gallery = tmp_path / "gallery"
    people = tmp_path / "people"
    shutil.copytree(SCENES / "knn" / "train" / "obama", people / "obama")
    assert run(capsys, "enroll", "--gallery", str(gallery), str(people))[0] == 0
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    good = SCENES / "knn" / "test" / "obama1.jpg"
    code, results = run(capsys, "recognize", "--gallery", str(gallery), str(broken), str(good))
    assert code == 2
    assert results[0]["reason"] == "not_an_image" and "error" in results[0]
    assert results[1]["name"] == "obama"


def test_enroll_refuses_group_photos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    people = tmp_path / "people"
    (people / "group").mkdir(parents=True)
    shutil.copy(SCENES / "couple.jpg", people / "group" / "couple.jpg")
    code, (summary,) = run(capsys, "enroll", "--gallery", str(tmp_path / "g"), str(people))
    assert code == 0 and summary["enrolled_faces"] == 0 and summary["refused_photos"] == 1


def test_verify_same_and_different_people(capsys: pytest.CaptureFixture[str]) -> None:
    sorkin = LFW / "images" / "Aaron_Sorkin"
    code, (same,) = run(capsys, "verify", str(sorkin / "Aaron_Sorkin_0001.jpg"), str(sorkin / "Aaron_Sorkin_0002.jpg"))
    assert code == 0 and same["same_person"] is True
    other = LFW / "images" / "AJ_Cook" / "AJ_Cook_0001.jpg"
    code, (different,) = run(capsys, "verify", str(sorkin / "Aaron_Sorkin_0001.jpg"), str(other))
    assert code == 0 and different["same_person"] is False
    assert float(same["similarity"]) > float(different["similarity"])  # type: ignore[arg-type]


def test_import_legacy_gallery(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(([torch.ones(1, 4), torch.zeros(1, 4) + 0.5], ["Paul", "John"]), tmp_path / "data.pt")
    code, (summary,) = run(
        capsys,
        "gallery",
        "import-legacy",
        str(tmp_path / "data.pt"),
        "--gallery",
        str(tmp_path / "g"),
        "--model-id",
        "m",
    )
    assert code == 0 and summary["people"] == {"John": 1, "Paul": 1}
    assert summary["faces_with_chips"] == 0 and "no chips" in str(summary["note"])
    code, (shown,) = run(capsys, "gallery", "show", "--gallery", str(tmp_path / "g"))
    assert code == 0 and shown["faces_with_chips"] == 0
    without = shown["faces_without_chips"]
    assert isinstance(without, list) and sorted(f["name"] for f in without) == ["John", "Paul"]
    # Legacy faces cannot be embedded again (no chip): a re-embedding lists them and leaves them out.
    code, (report,) = run(
        capsys, "gallery", "reembed", "--gallery", str(tmp_path / "g"), "--checkpoint", "casia-webface-512"
    )
    assert code == 0 and report["embedded"] == 0
    assert sorted(f["name"] for f in report["without_chip"]) == ["John", "Paul"]  # type: ignore[attr-defined]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("facerec")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True, timeout=60)
    for command in ("enroll", "recognize", "verify", "eval", "weights"):
        assert command in out.stdout


def test_every_command_is_registered_once_with_its_handler() -> None:
    """The parser is the one list of commands: each leaf command carries the function that runs it."""
    import argparse

    from facerec.cli.main import build_parser

    def leaves(parser: argparse.ArgumentParser, path: list[str]) -> list[tuple[list[str], argparse.ArgumentParser]]:
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not groups:
            return [(path, parser)]
        return [leaf for name, sub in groups[0].choices.items() for leaf in leaves(sub, [*path, name])]

    found = leaves(build_parser(), [])
    assert len(found) >= 20
    missing = [" ".join(path) for path, parser in found if not callable(parser.get_default("run"))]
    assert missing == []
