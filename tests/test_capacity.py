"""The capacity model's arithmetic: which part limits the cluster at each size, from a benchmark's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.capacity import S3_WRITES_PER_PREFIX_S, capacity, path_costs, table


def _result(head_ms: float, worker_ms: tuple[float, float], idle: float = 0.25) -> dict[str, object]:
    def node(per_image: float, processes: dict[str, float], idle_cores: float) -> dict[str, object]:
        return {"per_image_ms": per_image, "idle_cores": idle_cores, "processes_per_image": processes}

    nodes = {
        "head": node(head_ms, {"GalleryWriter": head_ms}, idle),
        "worker 1": node(sum(worker_ms), {"Recognizer": worker_ms[0], "SqsBridge": worker_ms[1]}, 0.05),
        "worker 2": node(sum(worker_ms), {"Recognizer": worker_ms[0], "SqsBridge": worker_ms[1]}, 0.05),
        "worker nodes, unattributed": node(0.0, {}, 0.03),  # not a worker: left out of the mean
        "outside the cluster": node(50.0, {"moto": 50.0}, 0.0),
    }
    return {
        "paths": {"queue": {"cpu_ms_per_image": nodes}},
        "machine": {"cpu": "test CPU", "isa": "AVX2"},
        "configuration": "synthetic",
    }


def test_workers_limit_a_small_cluster_and_the_head_or_s3_a_large_one() -> None:
    cost = path_costs(_result(head_ms=2.0, worker_ms=(30.0, 10.0)))["queue"]
    assert cost.worker_ms == pytest.approx(40.0) and cost.head_ms == 2.0
    one = capacity(cost, 1, worker_vcpus=4, head_vcpus=2)
    assert one.images_per_s == pytest.approx(100.0) and one.limited_by == "1 workers' CPU"
    # 16 workers could do 1,600/s; the head (1.75 free cores at 2 ms) caps it at 875/s.
    sixteen = capacity(cost, 16, worker_vcpus=4, head_vcpus=2)
    assert sixteen.images_per_s == pytest.approx(875.0) and sixteen.limited_by == "the head's CPU"
    # A head with no per-image work: the output bucket's one prefix (two writes per image) comes next.
    free_head = path_costs(_result(head_ms=0.0, worker_ms=(30.0, 10.0)))["queue"]
    big = capacity(free_head, 64, worker_vcpus=4, head_vcpus=2)
    assert big.images_per_s == pytest.approx(S3_WRITES_PER_PREFIX_S / 2)
    assert big.limited_by == "S3 writes to the output bucket (one prefix)"


def test_the_table_names_its_measurement_and_each_sizes_limit(tmp_path: Path) -> None:
    result = tmp_path / "cluster_cpu.json"
    result.write_text(json.dumps(_result(head_ms=2.0, worker_ms=(30.0, 10.0))))
    text = table(result, [1, 16], worker_vcpus=4, head_vcpus=2)
    assert "cluster_cpu.json (test CPU, AVX2" in text
    assert "| queue | 1 | 100 | 1 workers' CPU |" in text
    assert "| queue | 16 | 875 | the head's CPU |" in text
