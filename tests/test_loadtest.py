"""``cnnserve loadtest`` against real servers: every target answers without errors, the report's
numbers hang together, the JSON/CSV outputs parse, and metrics read from the wrong server are
called out. No speed assertions."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.config import LoadConfig
from loadtest.machine import spread
from loadtest.metrics import Monitor, Sample, parse_metrics, server_delta
from loadtest.probe import Probe
from loadtest.report import CSV_COLUMNS
from service import cli
from tests.conftest import MODEL_PATH, ServerProcess

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
            "--metrics-address",
            f"127.0.0.1:{server.http_port}",
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
    assert "req/s" in printed and "p99" in printed and "WARNING" not in printed
    assert "load average" in printed

    report = json.loads(out_json.read_text())
    s = report["summary"]
    assert s["ok"] > 0 and s["errors"] == 0 and report["errors_by_code"] == {}
    assert s["images"] == 2 * s["ok"]
    assert s["req_per_s"] > 0 and abs(s["img_per_s"] - 2 * s["req_per_s"]) < 1e-6
    lat = s["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    srv = report["server"]
    assert srv is not None, report["server_scrape_error"]
    assert srv["batches"] > 0 and srv["batch_size_mean"] >= 1
    # Every request waits some time in the queue, never longer than the slowest whole request took.
    assert 0 < srv["queue_ms_mean"] <= lat["max"], (srv, lat)
    assert report["server_warnings"] == [], report["server_warnings"]
    # The client worked for 0.8 s (so it used some CPU), and no process uses more than every core.
    assert 0 < report["client"]["cpu_percent"] <= 100 * report["machine"]["cpu_count"], report["client"]
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["python"]

    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 1 and list(rows[0]) == CSV_COLUMNS
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
    d = server_delta(before, after)
    assert d["batches"] == 5 and d["images"] == 40 and d["batch_size_mean"] == 8.0
    assert d["queue_ms_mean"] == pytest.approx(2.0) and d["compute_ms_mean"] == pytest.approx(100.0)
    assert server_delta(None, after) is None
    assert spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}


@pytest.fixture(scope="module")
def second_server(tmp_path_factory):
    """Another server, as a user might have running on the same machine: the same cifar10 model
    and a second one named ``other``."""
    repo = tmp_path_factory.mktemp("repo")
    for name in ("cifar10", "other"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").symlink_to(MODEL_PATH)
    s = ServerProcess("--drain-seconds", "0", "--model-repository", str(repo))
    yield s
    assert s.stop() == 0, s.log


def _report(tmp_path, argv: list[str]) -> tuple[dict, str]:
    out = tmp_path / "run.json"
    assert _run([*argv, "--duration", "0.6", "--warmup", "0.2", "-c", "2", "--json", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_grpc_target_off_the_default_port_needs_metrics_address(server, tmp_path, capsys):
    """gRPC does not tell the server's HTTP port: off port 8001 the report says so rather than
    reading 127.0.0.1:8000, whoever listens there."""
    report, _ = _report(tmp_path, ["--target", "grpc", "--address", server.grpc_target])
    printed = capsys.readouterr().out
    assert report["server"] is None and report["config"]["metrics_url"] is None
    assert "--metrics-address" in report["server_scrape_error"] and server.grpc_target in report["server_scrape_error"]
    assert "--metrics-address" in printed and "127.0.0.1:8000" not in printed
    assert "load average" in printed and report["load_average_before"] is not None


def test_metrics_of_another_server_are_called_out(server, second_server, tmp_path, capsys):
    """Load on one server, metrics from another serving the same model: its request counter did
    not grow with the requests sent."""
    report, _ = _report(
        tmp_path,
        [
            "--target",
            "grpc",
            "--address",
            server.grpc_target,
            "--metrics-address",
            f"127.0.0.1:{second_server.http_port}",
        ],
    )
    printed = capsys.readouterr().out
    warnings = report["server_warnings"]
    assert len(warnings) == 1, warnings
    assert f"127.0.0.1:{second_server.http_port}" in warnings[0] and "another server" in warnings[0]
    assert str(report["summary"]["requests"]) in warnings[0]
    assert "WARNING   the metrics at" in printed


def test_metrics_of_another_model_are_called_out(server, second_server, tmp_path, capsys):
    """Load on model ``other`` of the second server, metrics from the first, which lacks it."""
    report, _ = _report(
        tmp_path,
        [
            "--target",
            "grpc-v2",
            "--model",
            "other",
            "--address",
            second_server.grpc_target,
            "--metrics-address",
            f"127.0.0.1:{server.http_port}",
        ],
    )
    capsys.readouterr()
    warnings = report["server_warnings"]
    assert len(warnings) == 2, warnings
    assert "another model or server (cifar10/1)" in warnings[0] and "model other/1" in warnings[0]
    assert "another server" in warnings[1]


def test_http_target_on_the_second_server_reads_its_own_metrics(second_server, tmp_path, capsys):
    """HTTP targets scrape their own address by default; model ``other`` is found there."""
    address = f"127.0.0.1:{second_server.http_port}"
    report, _ = _report(tmp_path, ["--target", "http", "--model", "other", "--address", address])
    capsys.readouterr()
    assert report["config"]["metrics_url"] == f"http://{address}/metrics"
    assert report["server_warnings"] == [] and report["server"]["batches"] > 0
    assert report["inputs"]["check"].startswith("model other/1")


def test_metrics_address_resolution():
    assert LoadConfig(target="http", address="h:9000").resolved_metrics_url() == "http://h:9000/metrics"
    assert LoadConfig(target="grpc").resolved_metrics_url() == "http://127.0.0.1:8000/metrics"
    assert LoadConfig(target="grpc-v2", address="h:8001").resolved_metrics_url() == "http://h:8000/metrics"
    assert LoadConfig(target="grpc", address="h:9001").resolved_metrics_url() is None
    given = LoadConfig(target="grpc", address="h:9001", metrics_address="h:9000")
    assert given.resolved_metrics_url() == "http://h:9000/metrics"
    assert LoadConfig(metrics_address="https://m:1").resolved_metrics_url() == "https://m:1/metrics"
    assert LoadConfig(metrics_address="http://m:1/x/metrics").resolved_metrics_url() == "http://m:1/x/metrics"
    assert LoadConfig(target="http", metrics_address="none").resolved_metrics_url() is None
    # The flag's former name still works.
    assert cli.build_parser().parse_args(["loadtest", "--metrics-url", "m:1"]).metrics_address == "m:1"


def test_other_clients_load_is_called_out():
    """A server whose counter grew far beyond what this run sent had other clients too."""
    cfg = LoadConfig(target="http", concurrency=4)
    monitor = Monitor(cfg, [[0.0, 0.0, 0.0]], start=0.0, model="cifar10")
    monitor.before = Sample({"requests:http": 100.0}, {("cifar10", "1")})
    monitor.after = Sample({"requests:http": 1100.0}, {("cifar10", "1")})
    probe = Probe("cifar10", "1", "")
    (warning,) = monitor.warnings(cfg, probe, sent=200)
    assert "counted 1000 http requests" in warning and "other clients" in warning
    assert monitor.warnings(cfg, probe, sent=900) == []


def test_parse_metrics_reads_one_models_figures(server):
    import urllib.request

    text = urllib.request.urlopen(f"{server.http}/metrics", timeout=10).read().decode()
    sample = parse_metrics(text, "cifar10")
    assert ("cifar10", "1") in sample.models
    assert parse_metrics(text, "absent").values.get("cnnserve_batch_size_count", 0.0) == 0.0


def test_aiohttp_client(server, capsys):
    address = f"127.0.0.1:{server.http_port}"
    argv = ["--target", "http", "--address", address, "--http-client", "aiohttp", "-n", "20", "--warmup", "0"]
    assert _run([*argv, "--fail-on-error"]) == 0
    assert "20 ok, 0 errors" in capsys.readouterr().out


def test_aiohttp_missing_is_a_clear_error(server):
    """Without the loadtest extra, --http-client aiohttp says which package and extra to install."""
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from service import cli\n"
        f"sys.exit(cli.main(['loadtest', '--target', 'http', '--address', '127.0.0.1:{server.http_port}',"
        " '--http-client', 'aiohttp', '-n', '5']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "aiohttp" in proc.stderr and "cnnserve[loadtest]" in proc.stderr


def test_help_lists_loadtest_without_importing_it():
    """``cnnserve --help`` lists the command and ``cnnserve loadtest --help`` its flags, without
    importing the load generator (numpy, grpc.aio) to build the parser."""
    code = (
        "import sys\n"
        "from service import cli\n"
        "parser = cli.build_parser()\n"
        "heavy = sorted(m for m in ('loadtest.runner', 'loadtest.clients', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
        "cli.main(['loadtest', '--help'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout and "--metrics-address" in proc.stdout and "--http-client" in proc.stdout
    top = subprocess.run([sys.executable, "-m", "service.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "loadtest" in top.stdout


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
    points = {"grpc c=1 images/s", "grpc c=1 p50 ms", "http c=1 images/s", "http c=1 p50 ms"}
    assert points <= set(results)
    # And the server processes' CPU per request, by role (front end; executor with --executor device).
    cpu = set(results) - points
    assert {k.split(" ", 2)[0] for k in cpu} == {"grpc", "http"} and all(k.endswith(" core-ms/req") for k in cpu), cpu
    for per_server in results.values():
        assert len(per_server) == 2 and all(s["median"] > 0 for s in per_server.values())
