"""MTCNN detection, step by step: facenet-pytorch's ``detect_face`` against ``serve_app.model.mtcnn_batched``.

    .venv/bin/python bench/detection_steps.py [--images 64] [--repeats 3] [--threads 2] [--modes per_level,auto]

Workloads: LFW photos at their 250x250 and downscaled to 64x64 (PIL bilinear), in batches of 1 and 16, and the
group photos of scenes/*.jpg one at a time (downscaled to at most 1280 pixels, as the service's detector does).
Every variant runs every workload ``--repeats`` times, interleaved so that other load on the machine spreads over
all of them; the pass with the least CPU time counts, and its per-step times are reported. Steps are timed by
wrapping the functions and networks each implementation calls; "other" is the rest (box generation, NMS,
regression, Python). Writes bench/results/detection_steps.json and prints a table in ms per image.

The measure is CPU time (both threads together), not wall time: these 2-core machines are shared, and under load
a wall clock mostly measures the other processes. OpenMP is set to wait passively (unless OMP_WAIT_POLICY is set),
so that a worker thread waiting for work does not spin and count as busy; it has to be set before torch loads.
Wall times are reported too; they mean something only when the load average (recorded) is below 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from facenet_pytorch import MTCNN
from facenet_pytorch.models.utils import detect_face as facenet_detect
from machine import describe, results_dir
from PIL import Image
from torch import nn

from serve_app.model import mtcnn_batched
from serve_app.model.mtcnn_batched import PyramidMode

DATASETS = Path(os.environ.get("FACEREC_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))
RESULTS = results_dir()

#: The service's detection settings (serve_app/model/detector.py, DetectorConfig): facenet-pytorch's defaults.
MIN_FACE_SIZE = 20.0
THRESHOLDS = (0.6, 0.7, 0.7)
PYRAMID_FACTOR = 0.709
#: DetectorConfig.max_side: larger photos are downscaled before detection.
MAX_SIDE = 1280
SMALL_SIDE = 64

STEPS = ("pyramid", "pnet", "area_table", "rnet_crops", "rnet", "onet_crops", "onet", "other")
Detect = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclass
class StepClock:
    """CPU seconds spent per step, filled by the wrappers that ``instrumented`` installs."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def wrap(self, fn: Callable[..., Any], step: Callable[..., str]) -> Callable[..., Any]:
        """``fn`` that adds its CPU time to the step named by ``step(*args, **kwargs)``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[step(*args, **kwargs)] += time.process_time() - started

        return timed


class TimedNet(nn.Module):
    """A network whose forward passes are timed; holds the original as a submodule, so its parameters show."""

    def __init__(self, inner: nn.Module, clock: StepClock, step: str) -> None:
        super().__init__()
        self.inner = inner
        self._timed = clock.wrap(inner, lambda *_a, **_k: step)

    def forward(self, x: torch.Tensor) -> Any:
        return self._timed(x)


@contextmanager
def patched(owner: object, name: str, replacement: object) -> Iterator[None]:
    """``owner.name`` replaced for the duration of the block."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@dataclass(frozen=True)
class Variant:
    """A detect function to measure, with its extra keyword arguments."""

    name: str
    detect: Detect
    kwargs: dict[str, Any]


class FacenetResizeSteps:
    """Names facenet-pytorch's ``imresample`` calls: the first ``levels`` of each detect call build the pyramid,
    the later ones are RNet (24x24) and ONet (48x48) crops."""

    def __init__(self, levels: int) -> None:
        self.levels = levels
        self.calls = 0

    def __call__(self, _img: torch.Tensor, sz: Sequence[int]) -> str:
        self.calls += 1
        if self.calls <= self.levels:
            return "pyramid"
        return "rnet_crops" if sz[0] == mtcnn_batched.RNET_SIZE else "onet_crops"


def _crop_step(*args: Any, **_kwargs: Any) -> str:
    """The step of a ``_crop_and_resize(table, image_inds, boxes, size, dtype)`` call."""
    return "rnet_crops" if args[3] == mtcnn_batched.RNET_SIZE else "onet_crops"


def _named(step: str) -> Callable[..., str]:
    """A step namer that always answers ``step``."""
    return lambda *_args, **_kwargs: step


@contextmanager
def instrumented(variant: Variant, clock: StepClock, resize_steps: FacenetResizeSteps) -> Iterator[None]:
    """Install the step timers for one implementation (module globals are looked up at call time)."""
    if variant.detect is facenet_detect.detect_face:
        with patched(facenet_detect, "imresample", clock.wrap(facenet_detect.imresample, resize_steps)):
            yield
    else:
        with (
            patched(mtcnn_batched, "_pyramid_canvas", clock.wrap(mtcnn_batched._pyramid_canvas, _named("pyramid"))),
            patched(mtcnn_batched, "_pnet_canvas", clock.wrap(mtcnn_batched._pnet_canvas, _named("pnet"))),
            patched(
                mtcnn_batched, "_summed_area_table", clock.wrap(mtcnn_batched._summed_area_table, _named("area_table"))
            ),
            patched(mtcnn_batched, "_crop_and_resize", clock.wrap(mtcnn_batched._crop_and_resize, _crop_step)),
        ):
            yield


@dataclass(frozen=True)
class Workload:
    """Equal-size images detected ``batch`` at a time."""

    name: str
    images: list[np.ndarray]
    batch: int


@dataclass
class Pass:
    """One run of a variant over a workload: CPU and wall seconds in all, CPU seconds per step."""

    cpu: float
    wall: float
    steps: dict[str, float]


def run_pass(workload: Workload, variant: Variant, nets: tuple[nn.Module, nn.Module, nn.Module]) -> Pass:
    """Detect every image of ``workload`` once with ``variant``, timing each step."""
    clock = StepClock()
    timed_nets: list[nn.Module] = [
        TimedNet(net, clock, step) for net, step in zip(nets, ("pnet", "rnet", "onet"), strict=True)
    ]
    if variant.detect is not facenet_detect.detect_face:
        timed_nets[0] = nets[0]  # the batched code calls PNet's layers itself; _pnet_canvas is timed instead
    cpu = wall = 0.0
    for start in range(0, len(workload.images), workload.batch):
        batch = torch.from_numpy(np.stack(workload.images[start : start + workload.batch]))
        height, width = batch.shape[1:3]
        levels = len(
            mtcnn_batched.PyramidLayout.plan(height, width, MIN_FACE_SIZE, PYRAMID_FACTOR, PyramidMode.PER_LEVEL).scales
        )
        with instrumented(variant, clock, FacenetResizeSteps(levels)), torch.inference_mode():
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            variant.detect(
                batch,
                MIN_FACE_SIZE,
                *timed_nets,
                list(THRESHOLDS),
                PYRAMID_FACTOR,
                torch.device("cpu"),
                **variant.kwargs,
            )
            cpu += time.process_time() - started_cpu
            wall += time.perf_counter() - started_wall
    steps = {step: clock.seconds.get(step, 0.0) for step in STEPS if step != "other"}
    steps["other"] = cpu - sum(steps.values())
    return Pass(cpu=cpu, wall=wall, steps=steps)


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def workloads(count: int) -> list[Workload]:
    """LFW at 250x250 and 64x64 in batches of 1 and 16, and each scenes/*.jpg photo alone."""
    lfw_paths = sorted((DATASETS / "lfw-view1" / "images").glob("*/*.jpg"))[:count]
    full = [load_rgb(p) for p in lfw_paths]
    small = [img.resize((SMALL_SIDE, SMALL_SIDE), Image.Resampling.BILINEAR) for img in full]
    loads = [
        Workload(f"lfw{size}_b{batch}", [np.asarray(img) for img in imgs], batch)
        for size, imgs in ((250, full), (SMALL_SIDE, small))
        for batch in (1, 16)
    ]
    for path in sorted((DATASETS / "scenes").glob("*.jpg")):
        img = load_rgb(path)
        longest = max(img.size)
        if longest > MAX_SIDE:  # as FaceDetector._detection_view does
            scale = MAX_SIDE / longest
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        loads.append(Workload(f"{path.stem}_{img.width}x{img.height}", [np.asarray(img)], 1))
    return loads


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="LFW photos per workload")
    parser.add_argument("--repeats", type=int, default=3, help="passes per variant; the fastest counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--modes",
        default="per_level,auto",
        help="PyramidMode values of the batched detector to run, comma-separated (also: tiled)",
    )
    parser.add_argument("--only", default="", help="run only the workloads whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    mtcnn = MTCNN(device=torch.device("cpu"))
    mtcnn.eval()
    mtcnn.to(memory_format=torch.channels_last)  # as FaceDetector does
    nets = (mtcnn.pnet, mtcnn.rnet, mtcnn.onet)
    variants = [Variant("facenet", facenet_detect.detect_face, {})] + [
        Variant(f"batched_{mode}", mtcnn_batched.detect_faces, {"pyramid": PyramidMode(mode)})
        for mode in args.modes.split(",")
    ]
    loads = [load for load in workloads(args.images) if args.only in load.name]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for workload in loads:
        warm = Workload(workload.name, workload.images[: workload.batch], workload.batch)
        for variant in variants:  # first calls pick and cache oneDNN kernels for each shape
            run_pass(warm, variant, nets)
        best: dict[str, Pass] = {}
        for _ in range(args.repeats):
            for variant in variants:
                result = run_pass(workload, variant, nets)
                if variant.name not in best or result.cpu < best[variant.name].cpu:
                    best[variant.name] = result
        baseline = best["facenet"]
        for variant in variants:
            result = best[variant.name]
            per_image = 1000.0 / len(workload.images)
            results.append(
                {
                    "workload": workload.name,
                    "images": len(workload.images),
                    "batch": workload.batch,
                    "variant": variant.name,
                    "cpu_ms_per_image": round(result.cpu * per_image, 3),
                    "wall_ms_per_image": round(result.wall * per_image, 3),
                    "cpu_speedup": round(baseline.cpu / result.cpu, 3),
                    "wall_speedup": round(baseline.wall / result.wall, 3),
                    "steps_cpu_ms_per_image": {k: round(v * per_image, 3) for k, v in result.steps.items()},
                }
            )
    report = {
        "benchmark": "detection_steps",
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": describe(),
        "cpu_flags": sorted(flag for flag in ("avx512_bf16", "amx_tile", "avx512f", "avx2") if flag in _cpu_flags()),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "detection_steps.json").write_text(json.dumps(report, indent=1) + "\n")
    print_table(results)
    print(f"load average {report['load_average_before']} -> {report['load_average_after']}, {report['seconds']} s")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def print_table(results: Sequence[dict[str, Any]]) -> None:
    """One row per workload and variant: CPU ms per image in all and per step, speed-up over facenet-pytorch
    (CPU time), and wall ms per image."""
    header = f"{'workload':<28} {'variant':<26} {'cpu ms':>8} {'x':>5} {'wall ms':>8} " + " ".join(
        f"{s:>10}" for s in STEPS
    )
    print("ms per image; cpu = both threads' CPU time, x = facenet-pytorch's CPU time / this one's")
    print(header)
    print("-" * len(header))
    for row in results:
        steps = " ".join(f"{row['steps_cpu_ms_per_image'][s]:>10.2f}" for s in STEPS)
        print(
            f"{row['workload']:<28} {row['variant']:<26} {row['cpu_ms_per_image']:>8.2f} {row['cpu_speedup']:>5.2f} "
            f"{row['wall_ms_per_image']:>8.2f} {steps}"
        )


if __name__ == "__main__":
    main()
