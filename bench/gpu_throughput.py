"""GPU worker floor: decode + detect + embed throughput of the shipped models on one CUDA device, and its host CPU.

    PYTHONPATH=. python3 bench/gpu_throughput.py [--device cuda] [--images 512] [--lfw DIR] [--threads 2]
        [--state-dict PATH] [--out FILE]
    .venv/bin/python bench/gpu_throughput.py --device cpu --images 16          # smoke test without a GPU
    .venv/bin/python bench/gpu_throughput.py --export-state-dict PATH         # shipped weights -> float16 .pt
    PYTHONPATH=. python3 bench/gpu_throughput.py --agreement-only [--check 16] [--images 512] ...  # TF32 study

Loads the shipped default models (``RecognitionConfig()``: checkpoint facenet-keras-128, MTCNN) on ``--device``
and measures, on LFW photos in ``model_throughput``'s order:

* images/s of decode + detect + embed of each photo's main face (``embed_main_faces``) at batch 1, 8, 32, 64;
* faces/s of the embedder alone on face crops, at batch 32 and 128 (float32, the shipped precision on a GPU, and
  bfloat16 autocast for comparison);
* the host CPU time per image (``time.process_time`` delta / images, all threads of the process): what a GPU
  worker still needs from its CPU for each photo (decode, PIL resizes, crops, NMS, kernel launches).

``--state-dict`` loads the embedder's weights from a state dict made by ``--export-state-dict`` (float16, half the
size of the Keras HDF5 file, for machines the HDF5 file cannot be carried to) instead of the HDF5 file; the
network, folding and precision are the shipped ones. Prints one JSON object; on CUDA it is also written to
bench/results/gpu/gpu_throughput.json (and to ``--out``).

``--agreement-only`` measures nothing else but how far the device's results are from the CPU's float32 ones on the
first ``--check`` photos, under each of :data:`TF32_MODES` (torch's defaults; TF32 off in cuDNN and matmul, with
``cudnn.benchmark`` off; the same with ``cudnn.deterministic``; TF32 on in both): per photo, the main face's box
(max absolute coordinate difference, pixels), the cosine of the full pipeline's embedding, the cosine of the device
embedder on the CPU detector's crops (embedding alone, detection excluded), and the cosine of the CPU embedder on
the device's crops (detection alone). It also times decode + detect + embed at batch 32 (``--images`` photos) with
the default flags and with TF32 off. On CUDA the JSON goes to bench/results/gpu/gpu_agreement.json (and ``--out``).

The first such run on an H200 (torch 2.11, cuDNN 9.19; ``--state-dict`` weights) was::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit
    PYTHONUNBUFFERED=1 python3 bench/gpu_throughput.py --device cuda --agreement-only --check 16 --images 512 \\
        --lfw .devcarry/lfw --state-dict .devcarry/weights/facenet_keras_128_fp16.pt --out $OUT/gpu_agreement.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_model, describe, results_dir

from serve_app.model.checkpoints import DEFAULT_CHECKPOINT, Checkpoint
from serve_app.model.detector import FaceDetector
from serve_app.model.embedder import Embedder, Precision
from serve_app.model.images import decode_image
from serve_app.model.pipeline import Models
from serve_app.model.recognizer import embed_main_faces
from serve_app.settings import RecognitionConfig, load_models

LFW_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lfw-view1" / "images"
RESULTS = results_dir() / "gpu"
PIPELINE_BATCHES = (1, 8, 32, 64)
#: Backend flags per agreement mode (``None``: torch's default, left as found). cuDNN convolutions use TF32 by
#: default; matmul (the detector's and embedder's linear layers) does not.
TF32_MODES: dict[str, dict[str, bool | None]] = {
    "default": {"matmul_tf32": None, "cudnn_tf32": None, "cudnn_benchmark": None, "cudnn_deterministic": None},
    "tf32_off": {"matmul_tf32": False, "cudnn_tf32": False, "cudnn_benchmark": False, "cudnn_deterministic": None},
    "tf32_off_deterministic": {
        "matmul_tf32": False,
        "cudnn_tf32": False,
        "cudnn_benchmark": False,
        "cudnn_deterministic": True,
    },
    "tf32_all_on": {"matmul_tf32": True, "cudnn_tf32": True, "cudnn_benchmark": None, "cudnn_deterministic": None},
}
TIMED_MODES = ("default", "tf32_off")
EMBED_BATCHES = (32, 128)


def lfw_payloads(count: int, skip: int = 0, images: Path = LFW_IMAGES) -> list[bytes]:
    """The bytes of ``count`` LFW photos in a fixed order (sorted by path), after the first ``skip``."""
    return [p.read_bytes() for p in sorted(images.glob("*/*.jpg"))[skip : skip + count]]


def _load_carried_keras(path: Path) -> torch.nn.Module:
    """The facenet-keras-128 network with weights from a state dict written by :func:`export_state_dict`."""
    from serve_app.model.weights.keras_h5 import build_keras_facenet_model

    model: torch.nn.Module = build_keras_facenet_model()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model


class CarriedWeightsConfig(RecognitionConfig):
    """The shipped settings, with the default checkpoint's weights read from a carried state dict."""

    state_dict: str

    def resolved_checkpoint(self) -> Checkpoint:
        shipped = super().resolved_checkpoint()
        if shipped.name != DEFAULT_CHECKPOINT:
            raise ValueError(f"a carried state dict stands in for {DEFAULT_CHECKPOINT} only, not {shipped.name}")
        return replace(shipped, load=partial(_load_carried_keras, Path(self.state_dict)))


def export_state_dict(path: Path) -> int:
    """Write the shipped Keras weights as a float16 state dict at ``path``; returns its size in bytes."""
    from serve_app.model.weights.files import keras_h5_path
    from serve_app.model.weights.keras_h5 import load_keras_facenet_state_dict

    state = load_keras_facenet_state_dict(keras_h5_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    return path.stat().st_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], None], count: int) -> dict[str, float]:
    """Run ``work`` once; per-item rate (``count`` items), host CPU ms per item and peak device memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {"per_s": round(count / wall, 2), "cpu_ms_per_item": round(cpu * 1000.0 / count, 3)}
    result["cpu_cores_busy"] = round(cpu / wall, 2)
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def pipeline(models: Models, payloads: Sequence[bytes], batch: int) -> None:
    """Decode, detect and embed the main face of ``payloads``, ``batch`` photos at a time."""
    for start in range(0, len(payloads), batch):
        images = [decode_image(p) for p in payloads[start : start + batch]]
        embed_main_faces(models.detector, models.embedder, images)


def face_crops(detector: FaceDetector, payloads: Sequence[bytes], count: int) -> torch.Tensor:
    """``count`` main-face crops (CPU, 0..255, as the embedder gets them), repeated cyclically from ``payloads``."""
    crops: list[torch.Tensor] = []
    for start in range(0, len(payloads), 32):
        images = [decode_image(p) for p in payloads[start : start + 32]]
        for image, found in zip(images, detector.detect_all(images), strict=True):
            face = found.subject()
            if face is not None:
                crops.append(detector.crops(image, [face]))
    faces = torch.cat(crops)
    return faces[torch.arange(count) % len(faces)].contiguous()


def embed_alone(embedder: Embedder, faces: torch.Tensor, batch: int, precision: Precision) -> dict[str, float]:
    """Faces/s of ``embedder.embed`` called with ``batch`` crops at a time (one forward pass each)."""
    embedder.max_batch, embedder.precision = batch, precision

    def work() -> None:
        for start in range(0, len(faces), batch):
            embedder.embed(faces[start : start + batch])

    for start in range(0, 2 * batch, batch):  # warm-up: kernel choice and allocation for this shape
        embedder.embed(faces[start : start + batch])
    return timed(embedder.device, work, len(faces))


def where_it_failed(exc: BaseException) -> dict[str, Any]:
    """The exception and the innermost frame inside this repository (the model line that failed)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "serve_app" in f.filename] or frames
    last = ours[-1]
    return {
        "error": f"{type(exc).__name__}: {exc}"[:500],
        "at": f"{last.filename}:{last.lineno}",
        "line": last.line,
        "traceback": traceback.format_exception(exc)[-12:],
    }


def agreement(models: Models, reference: Models, payloads: Sequence[bytes]) -> dict[str, Any]:
    """Main-face embeddings on the device against the same models on the CPU: same faces found, min cosine."""
    images = [decode_image(p) for p in payloads]
    ours = embed_main_faces(models.detector, models.embedder, images)
    theirs = embed_main_faces(reference.detector, reference.embedder, images)
    pairs = [(a, b) for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None]
    return {
        "images": len(images),
        "faces_found_device": sum(v is not None for v in ours),
        "faces_found_cpu": sum(v is not None for v in theirs),
        "min_cosine": round(min(float(np.dot(a, b)) for a, b in pairs), 5) if pairs else None,
    }


def backend_flags() -> dict[str, Any]:
    """The TF32 / cuDNN flags in force (and, where this torch has them, the newer ``fp32_precision`` settings)."""
    flags: dict[str, Any] = {
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }
    for name, owner in (("matmul_fp32_precision", "cuda.matmul"), ("conv_fp32_precision", "cudnn.conv")):
        try:
            target: Any = torch.backends
            for part in owner.split("."):
                target = getattr(target, part)
            flags[name] = str(target.fp32_precision)
        except Exception:  # older torch, or the legacy/new API mix check refused to answer
            continue
    return flags


def set_backend_flags(mode: dict[str, bool | None], defaults: dict[str, Any]) -> None:
    """Set the legacy TF32 / cuDNN flags of ``mode``; ``None`` restores the value in ``defaults``."""

    def pick(key: str) -> bool:
        value = mode[key]
        return bool(defaults[key]) if value is None else value

    torch.backends.cuda.matmul.allow_tf32 = pick("matmul_tf32")
    torch.backends.cudnn.allow_tf32 = pick("cudnn_tf32")
    torch.backends.cudnn.benchmark = pick("cudnn_benchmark")
    torch.backends.cudnn.deterministic = pick("cudnn_deterministic")


def _cosines(ours: Sequence[np.ndarray | None], theirs: Sequence[np.ndarray | None]) -> list[float | None]:
    return [
        None if a is None or b is None else round(float(np.dot(a, b)), 6) for a, b in zip(ours, theirs, strict=True)
    ]


def _summary(values: Sequence[float | None], worst: Callable[[Sequence[float]], float]) -> float | None:
    present = [v for v in values if v is not None]
    return round(worst(present), 6) if present else None


def _embed_each(embedder: Embedder, crops: Sequence[torch.Tensor | None]) -> list[np.ndarray | None]:
    """One embedding per crop (``None`` stays ``None``), all present crops in one ``embed`` call."""
    present = [c for c in crops if c is not None]
    if not present:
        return [None] * len(crops)
    vectors = iter(embedder.embed(torch.cat(present)))
    return [None if c is None else next(vectors) for c in crops]


def _main_faces(detector: FaceDetector, images: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor | None]]:
    """Each photo's subject (as ``embed_main_faces`` picks it) and its crop (``None`` where none)."""
    subjects = [found.subject() for found in detector.detect_all(images)]
    crops = [
        None if face is None else detector.crops(image, [face]) for image, face in zip(images, subjects, strict=True)
    ]
    return subjects, crops


def tf32_agreement(
    models: Models, reference: Models, payloads: Sequence[bytes], timing_payloads: Sequence[bytes]
) -> dict[str, Any]:
    """Device vs CPU float32 under each of :data:`TF32_MODES`: boxes, full, embed-only and detect-only cosines."""
    device = models.embedder.device
    images = [decode_image(p) for p in payloads]
    cpu_subjects, cpu_crops = _main_faces(reference.detector, images)
    cpu_vectors = _embed_each(reference.embedder, cpu_crops)
    defaults = backend_flags()
    out: dict[str, Any] = {
        "images": len(images),
        "faces_found_cpu": sum(face is not None for face in cpu_subjects),
        "torch_default_flags": defaults,
        "modes": {},
    }
    try:
        for name, mode in TF32_MODES.items():
            set_backend_flags(mode, defaults)
            row: dict[str, Any] = {"flags": backend_flags()}
            _main_faces(models.detector, images[:4])  # warm-up: kernel choice under these flags
            subjects, crops = _main_faces(models.detector, images)
            box_diff = [
                None if a is None or b is None else round(max(abs(x - y) for x, y in zip(a.box, b.box, strict=True)), 4)
                for a, b in zip(subjects, cpu_subjects, strict=True)
            ]
            full = _cosines(_embed_each(models.embedder, crops), cpu_vectors)
            embed_only = _cosines(_embed_each(models.embedder, cpu_crops), cpu_vectors)
            again = _cosines(_embed_each(models.embedder, cpu_crops), _embed_each(models.embedder, cpu_crops))
            detect_only = _cosines(_embed_each(reference.embedder, crops), cpu_vectors)
            row.update(
                {
                    "faces_found_device": sum(face is not None for face in subjects),
                    "full_min_cosine": _summary(full, min),
                    "embed_only_min_cosine": _summary(embed_only, min),
                    "detect_only_min_cosine": _summary(detect_only, min),
                    "box_max_abs_diff_px": _summary(box_diff, max),
                    "embed_repeat_min_cosine": _summary(again, min),
                    "per_photo": {
                        "box_max_abs_diff_px": box_diff,
                        "full_cosine": full,
                        "embed_only_cosine": embed_only,
                        "detect_only_cosine": detect_only,
                    },
                }
            )
            if name in TIMED_MODES and timing_payloads:
                try:
                    pipeline(models, timing_payloads[:64], 32)  # warm-up: batch 32 shapes under these flags
                    row["pipeline_batch_32"] = [
                        timed(device, partial(pipeline, models, timing_payloads, 32), len(timing_payloads))
                        for _ in range(2)
                    ]
                except Exception as exc:
                    row["pipeline_batch_32_failure"] = where_it_failed(exc)
            out["modes"][name] = row
    finally:
        set_backend_flags(TF32_MODES["default"], defaults)
    timed_rates = {
        name: max(r["per_s"] for r in out["modes"][name]["pipeline_batch_32"])
        for name in TIMED_MODES
        if "pipeline_batch_32" in out["modes"].get(name, {})
    }
    out["pipeline_batch_32_images_per_s"] = timed_rates
    if len(timed_rates) == len(TIMED_MODES) and timed_rates["default"]:
        out["tf32_off_throughput_ratio"] = round(timed_rates["tf32_off"] / timed_rates["default"], 3)
    return out


def gpu_facts(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"gpu": None}
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": torch.cuda.get_device_name(device),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=512, help="LFW photos per pipeline measurement")
    parser.add_argument("--faces", type=int, default=2048, help="face crops per embed-alone measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU side)")
    parser.add_argument("--lfw", type=Path, default=LFW_IMAGES, help="LFW images folder (<person>/<photo>.jpg)")
    parser.add_argument("--state-dict", type=Path, help="embedder weights from --export-state-dict, not the HDF5")
    parser.add_argument("--check", type=int, default=16, help="photos compared against the CPU models (0: none)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--agreement-only",
        action="store_true",
        help="only the device-vs-CPU agreement under each TF32 mode, and batch-32 pipeline speed with TF32 off",
    )
    parser.add_argument("--export-state-dict", type=Path, help="write the shipped weights as float16 .pt and exit")
    args = parser.parse_args()
    if args.export_state_dict:
        written = export_state_dict(args.export_state_dict)
        print(json.dumps({"state_dict": str(args.export_state_dict), "bytes": written}))
        return

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = RecognitionConfig() if args.state_dict is None else CarriedWeightsConfig(state_dict=str(args.state_dict))
    payloads = lfw_payloads(args.images, images=args.lfw)
    if not payloads:
        raise SystemExit(f"no LFW photos under {args.lfw}")
    result: dict[str, Any] = {
        "benchmark": "gpu_throughput",
        "device": str(device),
        **gpu_facts(device),
        "torch": torch.__version__,
        "host_cpu": cpu_model(),
        "images": len(payloads),
        "checkpoint": settings.checkpoint,
        "weights": "float16 state dict (from the shipped HDF5), run in float32" if args.state_dict else "HDF5",
        "max_embed_batch": settings.max_embed_batch,
        "torch_threads": args.threads,
        "failures": [],
    }
    started = time.perf_counter()
    models = load_models(settings, device=device)
    sync(device)
    result["load_s"] = round(time.perf_counter() - started, 2)
    result["embed_precision"] = models.embedder.precision

    if args.agreement_only:
        result["benchmark"] = "gpu_agreement"
        try:
            reference = load_models(settings, device=torch.device("cpu"))
            reference.embedder.precision = "float32"
            result["check_photos"] = [p.name for p in sorted(args.lfw.glob("*/*.jpg"))[: args.check]]
            result["tf32_agreement"] = tf32_agreement(models, reference, payloads[: args.check], payloads)
        except Exception as exc:
            result["failures"].append({"stage": "tf32 agreement", **where_it_failed(exc)})
        write_result(result, device, "gpu_agreement.json", args.out)
        return

    if args.check and device.type != "cpu":
        try:
            reference = load_models(settings, device=torch.device("cpu"))
            reference.embedder.precision = "float32"
            result["agreement_with_cpu_float32"] = agreement(models, reference, payloads[: args.check])
        except Exception as exc:
            result["failures"].append({"stage": "agreement", **where_it_failed(exc)})

    pipeline_rows: dict[str, Any] = {}
    for batch in PIPELINE_BATCHES:
        try:
            pipeline(models, payloads[: 2 * batch], batch)  # warm-up: this batch size's shapes
            pipeline_rows[str(batch)] = timed(device, partial(pipeline, models, payloads, batch), len(payloads))
        except Exception as exc:
            result["failures"].append({"stage": f"pipeline batch {batch}", **where_it_failed(exc)})
            break
    result["pipeline_images_per_s"] = {b: r["per_s"] for b, r in pipeline_rows.items()}
    result["pipeline_cpu_ms_per_image"] = {b: r["cpu_ms_per_item"] for b, r in pipeline_rows.items()}
    result["pipeline"] = pipeline_rows

    try:
        faces = face_crops(models.detector, payloads[:256], args.faces)
    except Exception as exc:  # detection failed on this device: crops from the CPU detector, to time the embedder
        result["failures"].append({"stage": "crops on device", **where_it_failed(exc)})
        faces = face_crops(FaceDetector(settings.detector_config()), payloads[:256], args.faces)
    embed_rows: dict[str, Any] = {}
    shipped_batch, shipped_precision = models.embedder.max_batch, models.embedder.precision
    precisions: list[Precision] = [shipped_precision] + (["bfloat16"] if device.type == "cuda" else [])
    for precision in precisions:
        for batch in EMBED_BATCHES:
            try:
                embed_rows[f"{precision} {batch}"] = embed_alone(models.embedder, faces, batch, precision)
            except Exception as exc:
                result["failures"].append({"stage": f"embed {precision} batch {batch}", **where_it_failed(exc)})
    models.embedder.max_batch, models.embedder.precision = shipped_batch, shipped_precision
    result["embed_faces"] = len(faces)
    result["embed_faces_per_s"] = {k: r["per_s"] for k, r in embed_rows.items()}
    result["embed"] = embed_rows
    write_result(result, device, "gpu_throughput.json", args.out)


def write_result(result: dict[str, Any], device: torch.device, name: str, out: Path | None) -> None:
    """Print ``result`` as one JSON line; on CUDA also write it to bench/results/gpu/``name``; and to ``out``."""
    result["machine"] = describe()
    text = json.dumps(result, indent=1) + "\n"
    if device.type == "cuda":
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(text)
    if out:
        out.write_text(text)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
