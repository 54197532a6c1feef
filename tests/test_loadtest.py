"""Smoke test of ``cnnserve loadtest`` against a real server: every target answers without errors,
the report's numbers hang together, and the JSON/CSV outputs parse. No speed assertions."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from service import cli, loadtest

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILE = ROOT / "models" / "cifar10" / "1" / "model.onnx"


def _address(server, target: str) -> str:
    return server.grpc_target if target.startswith("grpc") else f"127.0.0.1:{server.http_port}"


def _run(argv: list[str]) -> int:
    return cli.main(["loadtest", "--quiet", "--model-file", str(MODEL_FILE), *argv])


@pytest.mark.parametrize("target", ["grpc", "http", "grpc-v2", "http-v2"])
def test_closed_loop_target(server, tmp_path, capsys, target):
    out_json, out_csv = tmp_path / "run.json", tmp_path / "runs.csv"
    rc = _run(
        [
            "--target",
            target,
            "--address",
            _address(server, target),
            "--metrics-url",
            f"{server.http}/metrics",
            "--concurrency",
            "4",
            "--duration",
            "0.8",
            "--warmup",
            "0.2",
            "--images-per-request",
            "2",
            "--json",
            str(out_json),
            "--csv",
            str(out_csv),
            "--fail-on-error",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "req/s" in printed and "p99" in printed

    report = json.loads(out_json.read_text())
    s = report["summary"]
    assert s["ok"] > 0 and s["errors"] == 0 and report["errors_by_code"] == {}
    assert s["images"] == 2 * s["ok"]
    assert s["req_per_s"] > 0 and abs(s["img_per_s"] - 2 * s["req_per_s"]) < 1e-6
    lat = s["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    srv = report["server"]
    assert srv is not None, report["server_scrape_error"]
    assert srv["batches"] > 0 and srv["batch_size_mean"] >= 1 and srv["queue_ms_mean"] >= 0
    assert report["client"]["cpu_percent"] >= 0
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["python"]

    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 1 and list(rows[0]) == loadtest.CSV_COLUMNS
    assert rows[0]["target"] == target and int(rows[0]["ok"]) == s["ok"] and int(rows[0]["errors"]) == 0


def test_open_loop_two_processes_requests_bound(server, tmp_path, capsys):
    """Poisson arrivals split over 2 spawned client processes, bounded by a request count; the
    CSV gets one more row per run."""
    out_csv = tmp_path / "runs.csv"
    common = ["--target", "http", "--address", _address(server, "http"), "--csv", str(out_csv), "--fail-on-error"]
    assert _run([*common, "--rate", "200", "--processes", "2", "--requests", "60", "--warmup", "0"]) == 0
    assert _run([*common, "--concurrency", "2", "--requests", "20", "--warmup", "0"]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["loop"] for r in rows] == ["open", "closed"]
    assert [int(r["ok"]) for r in rows] == [60, 20]
    assert rows[0]["processes"] == "2" and float(rows[0]["rate"]) == 200


def test_unreachable_server_fails_setup(capsys):
    assert _run(["--target", "http", "--address", "127.0.0.1:1", "--duration", "0.5"]) == 2
    assert "127.0.0.1:1" in capsys.readouterr().err


def test_server_delta_and_spread():
    before = {
        "cnnserve_batch_size_sum": 10.0,
        "cnnserve_batch_size_count": 5.0,
        "cnnserve_queue_duration_seconds_sum": 0.010,
        "cnnserve_queue_duration_seconds_count": 10.0,
        "cnnserve_inference_duration_seconds_sum": 0.5,
        "cnnserve_inference_duration_seconds_count": 5.0,
    }
    after = {
        "cnnserve_batch_size_sum": 50.0,
        "cnnserve_batch_size_count": 10.0,
        "cnnserve_queue_duration_seconds_sum": 0.030,
        "cnnserve_queue_duration_seconds_count": 20.0,
        "cnnserve_inference_duration_seconds_sum": 1.0,
        "cnnserve_inference_duration_seconds_count": 10.0,
    }
    d = loadtest.server_delta(before, after)
    assert d["batches"] == 5 and d["images"] == 40 and d["batch_size_mean"] == 8.0
    assert d["queue_ms_mean"] == pytest.approx(2.0) and d["compute_ms_mean"] == pytest.approx(100.0)
    assert loadtest.server_delta(None, after) is None
    assert loadtest.spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}


def test_compare_revisions_quick_runs_both_servers(tmp_path):
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/compare_revisions.py",
            "--before",
            ".",
            "--after",
            ".",
            "--quick",
            "--targets",
            "grpc,http",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"grpc c=1 images/s", "grpc c=1 p50 ms", "http c=1 images/s", "http c=1 p50 ms"}
    for per_server in results.values():
        assert len(per_server) == 2 and all(s["median"] > 0 for s in per_server.values())
