"""Summarise every benchmark result in bench/results/ as one Markdown table for the README.

    .venv/bin/python bench/report.py [--results bench/results]

Reads each ``*.json`` there (any may be missing, or from an older run with fewer fields), prints a table of
benchmark, metric, value, ratio or target, and whether the target is met, and writes it to ``summary.md`` in the
same folder. Benchmarks it does not know get a row per top-level number.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import results_dir

RESULTS = results_dir()

#: One table row: metric, value, ratio/target, met ("yes", "no" or "" where there is no target).
Row = tuple[str, str, str, str]


def number(value: Any, unit: str = "") -> str:
    text = f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"
    return f"{text} {unit}".strip()


def met(flag: Any) -> str:
    return "" if flag is None else ("yes" if flag else "no")


def model_throughput(r: dict[str, Any]) -> list[Row]:
    return [
        ("one image at a time", number(r["single_images_per_s"], "img/s"), "", ""),
        (f"batched by {r['batch']}", number(r["batched_images_per_s"], "img/s"), f"{r['batched_over_single']}x", ""),
    ]


#: Targets from the benchmark brief: HTTP at concurrency 100 and the queue path, as fractions of the model floor.
HTTP_TARGET, QUEUE_TARGET = 0.8, 0.7


def http_load(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name, workload in r["workloads"].items():
        what = "LFW photos" if name == "lfw" else "64x64 photos"
        floor = workload["model_floor_images_per_s"]
        rows.append((f"model floor, {what} (in-process, batched)", number(floor, "img/s"), "", ""))
        for level in workload["http"]:
            ratio = workload["http_over_floor"][str(level["concurrency"])]
            at_100 = level["concurrency"] == 100
            wrong = level.get("wrong_answers")
            # Results from before the split counted an `Unknown` answer as wrong (no "unknown_answers" key).
            unknown = level.get("unknown_answers")
            checked = (
                ""
                if wrong is None
                else f"; {level['requests'] - wrong - (unknown or 0) - level['failures']} / {level['requests']} right"
                + ("" if unknown is None else f" ({unknown} Unknown, {wrong} another name)")
            )
            rows.append(
                (
                    f"HTTP POST /, {what}, concurrency {level['concurrency']}",
                    f"{number(level['images_per_s'], 'img/s')}; p50 / p95 / p99 "
                    f"{number(level['p50_ms'])} / {number(level['p95_ms'])} / {number(level['p99_ms'])} ms{checked}",
                    f"{ratio} of floor" + (f" (target ≥ {HTTP_TARGET})" if at_100 else ""),
                    met(float(ratio) >= HTTP_TARGET) if at_100 else "",
                )
            )
        for level in workload.get("http_in_recognizer", []):
            ratio = workload["http_in_recognizer_over_floor"][str(level["concurrency"])]
            rows.append(
                (
                    f"HTTP POST /, {what}, concurrency {level['concurrency']}, `INGRESS=in_recognizer` (not shipped)",
                    f"{number(level['images_per_s'], 'img/s')}; p95 {number(level['p95_ms'])} ms",
                    f"{ratio} of floor",
                    "",
                )
            )
    return rows


def small_faces(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for size in r["sizes"]:
        side = size["side"]
        goal = side == 64
        found = size["face_found_with_weak_candidate"]
        compared = (
            f"; facenet MTCNN() {size['facenet_default_found']:.2%}; before {size['without_upscaling_found']:.2%}"
            if size.get("facenet_default_found") is not None
            else ""
        )
        rows.append(
            (
                f"LFW View 1 at {side}x{side}: photos with a face found",
                f"{found:.2%} ({size['face_found_confident']:.2%} at >= 0.95{compared})",
                "≥ 99.9% and ≥ facenet MTCNN()" if goal else "",
                met(found >= 0.999 and found >= size["facenet_default_found"]) if goal else "",
            )
        )
        rows.append(
            (
                f"LFW View 1 at {side}x{side}: DevTest accuracy",
                f"{size['devtest_accuracy']:.4f} (DevTrain threshold {size['devtrain_threshold']:.3f}); "
                f"{size['devtest_accuracy_at_shipped_threshold']:.4f} at the shipped {r['shipped_threshold']:.2f}",
                "",
                "",
            )
        )
    grown = [g for g in r["group_photos"] if g["faces"] > g["faces_without_upscaling"]]
    rows.append(
        (
            "group photos: faces found, with vs without small-photo upscaling",
            ", ".join(f"{g['photo']} {g['faces']}/{g['faces_without_upscaling']}" for g in r["group_photos"]),
            "no growth",
            met(not grown),
        )
    )
    return rows


def queue_throughput(r: dict[str, Any]) -> list[Row]:
    floor = r.get("queue_over_floor")
    rows = [
        ("HTTP, concurrency 100, same photos", number(r["http"]["images_per_s"], "img/s"), "", ""),
        (
            f"queue, {r['queue'].get('photos', '')} photos enqueue to last response".replace(",  ", ", "),
            number(r["queue"]["images_per_s"], "img/s"),
            f"{r['queue_over_http']}x HTTP"
            + (f"; {floor} of floor (target ≥ {QUEUE_TARGET})" if floor is not None else ""),
            met(floor >= QUEUE_TARGET) if floor is not None else "",
        ),
    ]
    if "model_floor_images_per_s" in r:
        rows.insert(0, ("model floor (in-process, batched)", number(r["model_floor_images_per_s"], "img/s"), "", ""))
    return rows


def cold_start(r: dict[str, Any]) -> list[Row]:
    return [(key.replace("_", " "), number(value), "", "") for key, value in _numbers(r).items()]


def _numbers(r: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every number in ``r``, nested keys joined, for results whose shape this report does not fix."""
    found: dict[str, Any] = {}
    for key, value in r.items():
        if isinstance(value, dict):
            found.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found[f"{prefix}{key}"] = value
    return found


def embedding_peak(r: dict[str, Any]) -> list[Row]:
    dtype = r.get("matmul_dtype", "float32")
    rows = [(f"torch.mm {r['matmul_size']}² {dtype} peak", number(r["matmul_peak_gflops_per_s"], "GFLOP/s"), "", "")]
    if "float32_matmul_peak_gflops_per_s" in r and dtype != "float32":
        rows.append(("torch.mm float32 peak", number(r["float32_matmul_peak_gflops_per_s"], "GFLOP/s"), "", ""))
    for entry in r["per_batch"]:
        rows.append(
            (
                f"embedding only, batch {entry['batch']}",
                f"{number(entry['images_per_s'], 'img/s')}, {number(entry['gflops_per_s'], 'GFLOP/s')}",
                f"{entry['fraction_of_peak']:.0%} of {dtype} mm peak",
                "",
            )
        )
    return rows


def app_tier_baseline(r: dict[str, Any]) -> list[Row]:
    return [
        (
            "original app tier (one at a time, gallery read per request)",
            number(r["baseline_images_per_s"], "img/s"),
            "",
            "",
        ),
        (f"model floor (batched by {r['batch']})", number(r["floor_images_per_s"], "img/s"), "", ""),
        ("floor / baseline", f"{r['floor_over_baseline']}x", f"≥ {r['target_ratio']}x", met(r.get("target_met"))),
    ]


def gallery_scale(r: dict[str, Any]) -> list[Row]:
    target = r["target_ms_at_1m"]
    verdicts = r.get("target_met_at_1m") or {}
    rows = []
    for size in r["sizes"]:
        at_1m = size["enrolled"] >= 1_000_000
        for name, key, verdict_key in (
            ("Gallery.match", "gallery_match", "gallery_match"),
            ("exact float32 reference", "exact_float32", "exact"),
        ):
            timings = size[key]
            verdict = verdicts.get(verdict_key, {}) if at_1m else {}
            agreement = timings.get("top1_agreement_with_exact")
            kernel = timings.get("coarse_float16")
            rows.append(
                (
                    f"{name}, {size['enrolled']:,} faces"
                    + (f" (top-1 agrees with exact {agreement:.1%})" if agreement is not None else "")
                    + (
                        ""
                        if kernel is None
                        else f" (candidates in {'float16' if kernel['single'] else 'float32'} single, "
                        f"{'float16' if kernel['batched'] else 'float32'} batched)"
                    ),
                    f"{number(timings['single_ms'], 'ms')} single, {number(timings['batched_ms'], 'ms')} batched",
                    f"≤ {target:g} ms" if at_1m else "",
                    f"{met(verdict.get('single'))} / {met(verdict.get('batched'))}" if verdict else "",
                )
            )
        memory = (
            f"{size['matrix_bytes'] / 2**20:,.0f} MiB matrix + {size.get('float16_copy_bytes', 0) / 2**20:,.0f} MiB "
            f"float16 copy; {size['rss_delta_bytes'] / 2**20:,.0f} MiB RSS growth"
        )
        rows.append((f"memory, {size['enrolled']:,} faces", memory, "", ""))
        products = size.get("candidate_products")
        if products and at_1m:
            rows.append(
                (
                    f"candidate product alone, {size['enrolled']:,} faces (one query linear / mv; per query batched)",
                    "; ".join(
                        f"{dtype} {number(t['single_linear_ms'])} / {number(t['single_mv_ms'])} / "
                        f"{number(t['batched_ms_per_query'], 'ms')}"
                        for dtype, t in products.items()
                    ),
                    "",
                    "",
                )
            )
    return rows


def gallery_changes(r: dict[str, Any]) -> list[Row]:
    targets = r["targets_at_1m"]
    rows: list[Row] = []
    for size in r["sizes"]:
        at_1m = size["faces"] >= 1_000_000
        enrolment, named = size["enrolment"], size["named_after_answer"]
        rows += [
            (
                f"enrolments/s, {size['faces']:,} faces ({enrolment['clients']} clients)",
                number(enrolment["per_s"], "/s"),
                f"≥ {targets['enrolments_per_s']:g}/s" if at_1m else "",
                met(enrolment["per_s"] >= targets["enrolments_per_s"]) if at_1m else "",
            ),
            (
                f"bytes moved per enrolled face (chips apart), {size['faces']:,} faces",
                f"{enrolment['bytes_per_face_without_chips']:,} B",
                f"< {targets['bytes_per_face']:,} B" if at_1m else "",
                met(enrolment["bytes_per_face_without_chips"] < targets["bytes_per_face"]) if at_1m else "",
            ),
            (
                f"answer -> both replicas name the face, {size['faces']:,} faces",
                f"{number(named['median_ms'], 'ms')} median, {number(named['max_ms'], 'ms')} max",
                f"≤ {targets['named_within_s']:g} s" if at_1m else "",
                met(named["max_ms"] <= 1000 * targets["named_within_s"]) if at_1m else "",
            ),
        ]
    return rows


def generic(r: dict[str, Any]) -> list[Row]:
    """Any benchmark this report does not know: its top-level numbers."""
    return [
        (key, number(value), "", "")
        for key, value in r.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


SUMMARISERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "model_throughput": model_throughput,
    "http_load": http_load,
    "queue_throughput": queue_throughput,
    "embedding_peak": embedding_peak,
    "app_tier_baseline": app_tier_baseline,
    "gallery_scale": gallery_scale,
    "gallery_changes": gallery_changes,
    "cold_start": cold_start,
    "small_faces": small_faces,
}


def summarise(path: Path) -> tuple[str, list[Row]]:
    """The benchmark's name and its rows; a file that cannot be read or summarised says so in a row."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return path.stem, [("(unreadable)", type(exc).__name__, "", "")]
    if not isinstance(result, dict):
        return path.stem, [("(not a result object)", "", "", "")]
    name = str(result.get("benchmark", path.stem))
    summariser = SUMMARISERS.get(name, generic)
    try:
        return name, summariser(result)
    except (KeyError, TypeError, ValueError, AttributeError):
        # An older or partial result: fall back to its top-level numbers rather than fail the whole report.
        return name, generic(result)


def isa(path: Path) -> str:
    """The CPU ISA a result was measured with (see bench/machine.py); older results name none."""
    try:
        machine = json.loads(path.read_text()).get("machine")
    except (OSError, ValueError, AttributeError):
        return "?"
    return str(machine.get("isa", "?")) if isinstance(machine, dict) else "?"


def table(results: Path) -> str:
    lines = ["| benchmark | metric | value | ratio / target | met? | CPU ISA |", "|---|---|---|---|---|---|"]
    for path in sorted(results.glob("*.json")):
        name, rows = summarise(path)
        for metric, value, ratio, verdict in rows:
            lines.append(f"| {name} | {metric} | {value} | {ratio} | {verdict} | {isa(path)} |")
    if len(lines) == 2:
        lines.append("| (no results yet) | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    markdown = table(args.results)
    if args.results.is_dir():
        (args.results / "summary.md").write_text(markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()
