"""``facerec monitor``: the service's panels as plots, from Prometheus's HTTP API (where no Grafana runs).

One PNG with a subplot per panel of :mod:`facerec.monitor_panels` (the same panels as the Grafana dashboard),
over the last ``--minutes``; prints one JSON line saying how many series and points each panel got.
``facerec monitor --grafana FILE`` writes the dashboard JSON itself (the repository's copy is
``monitoring/grafana/facerec.json``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from facerec.monitor_panels import PANELS, Panel, grafana_dashboard
from facerec.prometheus import query_range

log = logging.getLogger("facerec")

EXIT_UNAVAILABLE = 3


def plot(prometheus: str, minutes: float, out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - minutes * 60
    step = max(5.0, minutes * 60 / 240)
    columns = 2
    rows = math.ceil(len(PANELS) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(13, 3.2 * rows), dpi=100, squeeze=False)
    summary: dict[str, dict[str, int]] = {}
    try:
        for panel, axis in zip(PANELS, axes.flat, strict=False):
            summary[panel.title] = _draw(axis, panel, prometheus, start, end, step)
    except OSError as exc:
        plt.close(figure)
        log.error("Prometheus at %s cannot be reached: %s", prometheus, exc)
        return EXIT_UNAVAILABLE
    for axis in list(axes.flat)[len(PANELS) :]:
        axis.set_visible(False)
    figure.suptitle(f"facerec, last {minutes:g} min (Prometheus {prometheus})", fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    print(json.dumps({"png": str(out), "panels": summary}), flush=True)
    return 0


def _draw(axis: object, panel: Panel, prometheus: str, start: float, end: float, step: float) -> dict[str, int]:
    from matplotlib.axes import Axes

    assert isinstance(axis, Axes)
    series_count = points = 0
    for series in panel.series:
        for result in query_range(prometheus, series.promql, start, end, step):
            values = [(float(t), float(v)) for t, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")]
            if not values:
                continue
            label = series.legend
            for key, value in result["metric"].items():
                label = label.replace("{{" + key + "}}", value)
            axis.plot([(t - end) / 60 for t, _ in values], [v for _, v in values], label=label, linewidth=1.2)
            series_count += 1
            points += len(values)
    axis.set_title(panel.title, fontsize=9)
    axis.set_ylabel(panel.unit, fontsize=8)
    axis.set_xlabel("minutes ago", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3)
    if series_count:
        axis.legend(fontsize=7, loc="upper left")
    else:
        axis.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axis.transAxes, color="grey")
    return {"series": series_count, "points": points}


def write_grafana(out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(grafana_dashboard(), indent=1) + "\n")
    print(json.dumps({"dashboard": str(out), "panels": len(PANELS)}))
    return 0
