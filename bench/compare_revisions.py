"""Before/after: the server code of two git revisions, side by side on the same model and machine.

    .venv/bin/python bench/compare_revisions.py --before c893572 --after HEAD

Each revision is checked out into a temporary git worktree (``.`` means the working tree as it
is) and served with this checkout's virtual environment and ``models/``, so only the server code
differs. Both servers run at once; each target (default: gRPC Classify and HTTP /predict with
JPEGs; ``--targets grpc,http,grpc-v2,http-v2`` for all four) at concurrency 1 and 64 with one
image per request, and at concurrency 16 with 8 (``--images-per-request``), is measured in
interleaved rounds (the order flips every round) with ``cnnserve loadtest``.
Prints min/median/max images/s, p50 latency and core-ms per request: the server processes' CPU
time (/proc/PID/stat) over the requests they answered (their own ``cnnserve_requests_total``),
for the whole server and, with ``--server-args "--workers 2 --executor device"``, for the front
ends apart from the device executor (the model's work); writes bench/results/compare-revisions.json.
``--quick`` is a smoke run of seconds (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serverproc import ServerProcess  # noqa: E402
from loadtest.config import LoadConfig  # noqa: E402
from loadtest.machine import machine_info, spread  # noqa: E402
from loadtest.runner import run  # noqa: E402


def checkout(rev: str, tmp: Path) -> Path:
    if rev == ".":
        return ROOT
    target = tmp / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(target), rev], check=True)
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision (or . for the working tree)")
    ap.add_argument("--after", default=".", help="git revision (default: the working tree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--targets", default="grpc,http", help="comma-separated loadtest targets")
    ap.add_argument(
        "--images-per-request", type=int, default=8, help="images per request of the c=16 point (0: skip it)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of 0.5 s points, c=1 only")
    ap.add_argument(
        "--after-args",
        default="",
        help="extra serve flags for the after server only, e.g. '--workers 1 --precision fp32' to compare "
        "with a revision that predates those settings under the same process model and precision",
    )
    ap.add_argument(
        "--server-args",
        default="",
        help="extra serve flags for both servers, e.g. '--workers 2 --executor device' to measure the "
        "front ends' CPU apart from the model's",
    )
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "compare-revisions.json"))
    args = ap.parse_args()
    points = [(1, 1), (64, 1)] + ([(16, args.images_per_request)] if args.images_per_request > 0 else [])
    warmup = 0.5
    if args.quick:
        args.rounds, args.duration, points, warmup = 1, 0.5, [(1, 1)], 0.2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    results: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {
            f"before ({args.before})": checkout(args.before, Path(tmp)),
            f"after ({args.after})": checkout(args.after, Path(tmp)),
        }
        extra = {
            name: args.server_args.split() + (args.after_args.split() if name.startswith("after") else [])
            for name in trees
        }
        servers = {
            name: ServerProcess(*extra[name], cwd=tree, model_repository=ROOT / "models")
            for name, tree in trees.items()
        }
        try:
            for rnd in range(args.rounds):
                order = list(servers.items()) if rnd % 2 == 0 else list(servers.items())[::-1]
                for name, server in order:
                    for target in targets:
                        for c, k in points:
                            served, cpu = server.requests_served(), server.cpu_by_role()
                            r = run(
                                LoadConfig(
                                    target=target,
                                    address=server.address(target),
                                    concurrency=c,
                                    images_per_request=k,
                                    duration=args.duration,
                                    warmup=warmup,
                                    metrics_address="none",
                                    progress=False,
                                )
                            )["summary"]
                            cpu = {role: t - cpu[role] for role, t in server.cpu_by_role().items()}
                            served = max(server.requests_served() - served, 1)
                            point = f"{target} c={c}" + (f" k={k}" if k > 1 else "")
                            for role, seconds in cpu.items():
                                results.setdefault(f"{point} {role} core-ms/req", {}).setdefault(name, []).append(
                                    1000 * seconds / served
                                )
                            results.setdefault(f"{point} images/s", {}).setdefault(name, []).append(r["img_per_s"])
                            results.setdefault(f"{point} p50 ms", {}).setdefault(name, []).append(
                                r["latency_ms"]["p50"]
                            )
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            # Both drain at once (each serves on for its --drain-seconds after SIGTERM), not one after the other.
            for server in servers.values():
                server.terminate()
            for server in servers.values():
                server.stop()
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    summary = {metric: {name: spread(v) for name, v in per.items()} for metric, per in results.items()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "machine": machine_info(),
                "before": args.before,
                "after": args.after,
                "after_args": args.after_args,
                "rounds": args.rounds,
                "results": summary,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"{'metric':<40}" + "".join(f"{name:>34}" for name in trees))
    for metric, per in summary.items():
        print(
            f"{metric:<40}" + "".join(f"{s['min']:>10.3f} /{s['median']:>9.3f} /{s['max']:>9.3f}" for s in per.values())
        )
    print(f"(min / median / max over {args.rounds} rounds)  wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
