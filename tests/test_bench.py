"""The benchmark scripts' shared pieces: the server helper (bench/serverproc.py, which the tests'
ServerProcess is built on), the plots (bench/plots.py) and a smoke run of one benchmark end to end.
No timing assertions: the figures are measured on a quiet machine, not here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import ceiling, served
from bench.serverproc import ServerProcess
from tests.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_coldstart_quick_smoke(tmp_path):
    """bench/coldstart.py --quick: starts servers with serverproc (polling /readyz), loads them with
    the load tester, and writes its JSON and plot."""
    out_json, out_png = tmp_path / "coldstart.json", tmp_path / "coldstart.png"
    proc = subprocess.run(
        [sys.executable, "bench/coldstart.py", "--quick", "--json", str(out_json), "--plot", str(out_png)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out_json.read_text())
    assert len(result["rounds"]) == 2
    for row in result["rounds"]:
        assert row["exit_code"] == 0
        assert 0 < row["listening_s"] <= row["ready_s"] and row["stop_s"] > 0 and row["ready_in_logged_s"] > 0
        assert row["rss_ready_mib"] > 0 and row["hwm_mib"] >= row["rss_after_burst_mib"]
        assert all(v["ok"] > 0 and v["errors"] == 0 for v in row["burst"].values())
    assert out_png.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("module, name", [(served, "served.json"), (ceiling, "ceiling.json")])
def test_plots_of_the_committed_results(tmp_path, module, name):
    """The published figures can be redrawn from the committed results with bench/plots.py."""
    result = json.loads((ROOT / "bench" / "results" / name).read_text())
    out = tmp_path / "figure.png"
    module.plot(result, out)
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_server_that_fails_to_start_raises_with_its_log(tmp_path):
    """A server that exits during start-up is reported at once, with what it printed."""
    missing = tmp_path / "no-such-repository"
    with pytest.raises(RuntimeError, match="server did not") as info:
        ServerProcess("--model-repository", str(missing), timeout=60)
    assert "no-such-repository" in str(info.value)
