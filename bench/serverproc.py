"""``python -m service.cli serve`` in a subprocess on 127.0.0.1 with ephemeral ports: the one way
the tests (tests/conftest.py) and the benchmarks (bench/*.py) start a server.

The server's stderr is read by a thread, which keeps every line (``log``) and notes the two lines
this module relies on: ``listening http=HOST:PORT grpc=HOST:PORT`` (the ports it bound) and
`` ready in <seconds>s`` (models loaded and warmed). Nothing here is imported by the server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / "models"
LISTENING = re.compile(r"listening http=(\S+):(\d+) grpc=(\S+):(\d+)")
READY = re.compile(r" ready in ([0-9.]+)s")
SPAWNED = re.compile(r"started (device executor|front end) (\d+) \(pid (\d+)\)")
REQUESTS = re.compile(r"^cnnserve_requests_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc/PID/stat); 0 once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_cpus(spec: str | None) -> set[int] | None:
    """'0', '0,2' or '0-3' → a set of CPU numbers."""
    if not spec:
        return None
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def pinned_command(cmd: list[str], cpus: str | None) -> tuple[list[str], Callable[[], None] | None]:
    """``taskset -c CPUS`` in front of ``cmd`` (or sched_setaffinity in the child when there is no
    taskset); returns the command and a preexec_fn."""
    if not cpus:
        return cmd, None
    if shutil.which("taskset"):
        return ["taskset", "-c", cpus, *cmd], None
    wanted = parse_cpus(cpus)
    return cmd, (lambda: os.sched_setaffinity(0, wanted))


class ServerProcess:
    """A cnnserve server on 127.0.0.1, ports 0 (the OS picks), CPU provider, the bundled models.

    ``args`` are extra ``serve`` flags (a later flag wins over the defaults above). ``cwd``: the
    source tree to run (another checkout, for bench/compare_revisions.py). ``cpus``: pin it
    (``taskset -c``). ``wait``: "ready" (default), "listening" or "" (return at once). ``prefix``:
    a command that runs the server (``unshare -m ...``), which must ``exec`` it."""

    def __init__(
        self,
        *args: str,
        model_repository: Path | str | None = MODEL_REPOSITORY,
        env: dict | None = None,
        cwd: Path | str = ROOT,
        cpus: str | None = None,
        wait: str = "ready",
        timeout: float = 120,
        prefix: tuple[str, ...] = (),
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--providers",
            "cpu",
            *(["--model-repository", str(model_repository)] if model_repository is not None else []),  # None: default
            *args,
        ]
        self.command, preexec = pinned_command([*prefix, *cmd], cpus)
        self.lines: list[str] = []
        #: (role, index) -> pid of a multi-process server's children, latest incarnation.
        self.children: dict[tuple[str, int], int] = {}
        self.http_port = self.grpc_port = 0
        self.listening_at: float | None = None  # time.monotonic() of the listening line
        self.ready_in_s: float | None = None  # the server's own "ready in" figure
        self.stop_seconds: float | None = None  # SIGTERM to exit, set by stop()
        self._listening, self._ready = threading.Event(), threading.Event()
        self._output_read = threading.Event()  # the reader reached the end of stderr
        self._terminated = False  # SIGTERM sent (terminate())
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(
            self.command,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,
        )
        threading.Thread(target=self._read, name="server-stderr", daemon=True).start()
        try:
            if wait in ("ready", "listening"):
                self.wait_listening(timeout)
            if wait == "ready":
                self.wait_ready(timeout)
        except RuntimeError:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            spawned = SPAWNED.search(line)
            if spawned:
                self.children[(spawned.group(1), int(spawned.group(2)))] = int(spawned.group(3))
            m = LISTENING.search(line)
            if m and not self._listening.is_set():
                self.http_port, self.grpc_port = int(m.group(2)), int(m.group(4))
                self.listening_at = time.monotonic()
                self._listening.set()
            m = READY.search(line)
            if m and not self._ready.is_set():
                self.ready_in_s = float(m.group(1))
                self._ready.set()
        self._output_read.set()

    def wait_output(self, timeout: float = 10) -> bool:
        """Wait until ``log`` holds everything the server wrote: its exit alone does not say that the
        reader thread has taken the last lines from the pipe (nor that child processes, which share
        it, have closed it)."""
        return self._output_read.wait(timeout)

    def wait_listening(self, timeout: float = 120) -> None:
        if not self._wait(self._listening, timeout):
            raise RuntimeError("server did not start listening:\n" + self.log)

    def wait_ready(self, timeout: float = 120) -> None:
        self.wait_listening(timeout)
        if not self._wait(self._ready, timeout):
            raise RuntimeError("server did not become ready:\n" + self.log)

    def _wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for a log line; give up early when the process has exited."""
        deadline = time.monotonic() + timeout
        while not event.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.1)  # let the reader thread take the last lines
                return event.is_set()
        return True

    def poll_readyz(self, timeout: float = 120, interval: float = 0.005) -> float:
        """Seconds from spawn until GET /readyz answers 200 (polled every ``interval``)."""
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.http}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - self.spawned
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(interval)
        raise RuntimeError("server never answered /readyz with 200:\n" + self.log)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def http(self) -> str:
        """Base URL of the HTTP port."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def address(self, protocol: str) -> str:
        """host:port for a load-test target (grpc, grpc-v2, http, http-v2)."""
        return self.grpc_target if protocol.startswith("grpc") else self.http_address

    def roles(self) -> dict[str, list[int]]:
        """pids by role: the one process, or front ends and device executors. The supervisor of a
        multi-process server only watches its children, so its CPU is left out."""
        if not self.children:
            return {"process": [self.proc.pid]}
        out: dict[str, list[int]] = {}
        for (role, _), pid in self.children.items():
            out.setdefault("executor" if role == "device executor" else "front end", []).append(pid)
        return out

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of each role's processes (see ``roles``)."""
        return {role: sum(cpu_seconds(p) for p in pids) for role, pids in self.roles().items()}

    def requests_served(self) -> float:
        """Requests answered so far, every protocol and status: the sum of ``cnnserve_requests_total``
        (front ends' counters summed by the server). Counting on the server, not the client, counts the
        load generator's warm-up and probe too, which the CPU figures include."""
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(v) for v in REQUESTS.findall(text))

    def memory(self) -> dict:
        """VmRSS (resident now) and VmHWM (peak resident) in MiB, from /proc/PID/status."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0
        return out

    def run_folder(self) -> Path:
        """The server's run folder in /dev/shm: the one whose ``owner`` file names its supervisor."""
        for path in Path("/dev/shm").glob("cnnserve-*"):
            try:
                if int((path / "owner").read_text().split()[0]) == self.proc.pid:
                    return path
            except (OSError, ValueError):
                continue
        raise RuntimeError("the server's run folder was not found")

    def terminate(self) -> None:
        """SIGTERM without waiting: servers stopped side by side drain at the same time."""
        self.proc.send_signal(signal.SIGTERM)
        self._terminated = True

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit code and sets ``stop_seconds``."""
        started = time.monotonic()
        if self.proc.poll() is None:
            if not self._terminated:  # a second SIGTERM is not asked for
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stop_seconds = time.monotonic() - started
        self.wait_output(5)  # callers read the last lines next
        return self.proc.returncode
