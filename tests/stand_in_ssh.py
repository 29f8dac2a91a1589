"""``ssh`` and ``rsync`` stand-ins for tests that let Ray's cluster launcher reach its ssh step against moto.

moto's instances have fake addresses that nothing may connect to: these scripts only record their arguments
(one JSON line per call) and succeed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def stand_in_ssh(tmp_path: Path) -> tuple[Path, Path]:
    """The folder to put first on PATH, and the file the calls are recorded in."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name in ("ssh", "rsync"):
        script = bin_dir / name
        script.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"with open({str(calls)!r}, 'a') as f:\n"
            f"    f.write(json.dumps({{'tool': {name!r}, 'args': sys.argv[1:]}}) + '\\n')\n"
        )
        script.chmod(0o755)
    return bin_dir, calls


def recorded(calls: Path, tool: str = "ssh") -> list[dict[str, Any]]:
    if not calls.exists():
        return []
    return [call for call in map(json.loads, calls.read_text().splitlines()) if call["tool"] == tool]
