"""A worker's start-up, phase by phase: what the simulator charges a node before it serves.

A profile is a small YAML (or JSON) file, ``cluster/startup/unbaked.yaml`` and ``baked.yaml`` in this repository::

    name: baked
    phases:
      - {name: ec2_boot, seconds: 30, source: "cited: https://..."}
      - {name: setup, seconds: 0, source: "measured: time make install"}
      - {name: ray_join, seconds: 10, source: "assumption: ..."}
      - {name: replica_start, seconds: 7.4, on_reuse: true, source: "measured: bench/cold_start.py"}

A new node pays every phase, one after the other. A node that Ray has not yet terminated (still inside its idle
timeout) already has its machine, its setup and its raylet, so when it is wanted again it pays only the phases
marked ``on_reuse`` (the Recognizer replica's start). Each phase carries the ``source`` of its figure so that a
table built from a profile can say where every second came from.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

#: The profiles shipped with the repository.
PROFILES_DIR = Path(__file__).resolve().parent / "startup"
#: What ``cluster.yaml`` does today: every new worker installs the environment.
DEFAULT_PROFILE = PROFILES_DIR / "unbaked.yaml"


class StartupPhase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    seconds: float = Field(ge=0)
    source: str = Field(min_length=1, description="the command that measured it, the page that documents it")
    on_reuse: bool = Field(False, description="paid again when an idle node that still exists is wanted again")


class StartupProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    phases: list[StartupPhase] = Field(min_length=1)

    @property
    def new_node_s(self) -> float:
        """Seconds from the request for a new node to its replica's first answer: every phase."""
        return sum(phase.seconds for phase in self.phases)

    @property
    def reuse_s(self) -> float:
        """Seconds for a node still inside Ray's idle timeout to serve again: the ``on_reuse`` phases."""
        return sum(phase.seconds for phase in self.phases if phase.on_reuse)


def load_startup_profile(path: Path) -> StartupProfile:
    """Read a profile from YAML or JSON (JSON is YAML too); raises ``pydantic.ValidationError`` if malformed."""
    return StartupProfile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
