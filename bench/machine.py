"""What a benchmark figure was measured on: the CPU's vector ISA beside every result.

Machines of this project's kind are not one CPU: some have AVX-512 with bfloat16 (and AMX), some only AVX2, about
3x slower in absolute terms. A figure without its ISA cannot be compared, so every benchmark records this.

An AVX2-only machine can be approximated on an AVX-512 one by capping both of torch's kernel libraries:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (``make bench-avx2``). That is the same code paths and
instruction set, not the same chip (caches, clocks and memory differ), so such figures are labelled "capped".
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware_isa(flags: set[str]) -> str:
    """The widest vector ISA the CPU itself offers: AMX, AVX-512 BF16, AVX-512, AVX2 or older."""
    if "amx_tile" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "pre-AVX2"


def effective_isa(flags: set[str]) -> str:
    """The ISA torch's kernels actually use: the hardware's, or AVX2 where the environment caps it."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2") or os.environ.get(
        "ATEN_CPU_CAPABILITY", ""
    ).lower() in ("avx2", "default")
    return f"AVX2 (capped on {hardware_isa(flags)})" if capped else hardware_isa(flags)


def describe() -> dict[str, Any]:
    """The machine facts every benchmark result carries."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "isa": effective_isa(flags),
        "hardware_isa": hardware_isa(flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "arch": platform.machine(),
    }


def label(machine: dict[str, Any]) -> str:
    """A short caption for plots: ``AVX2, 2 cores``."""
    return f"{machine['isa']}, {machine['cores']} cores"


def results_dir() -> Path:
    """Where results go: ``bench/results``, or ``FACEREC_BENCH_RESULTS`` (``make bench-avx2`` keeps its own)."""
    return Path(os.environ.get("FACEREC_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
