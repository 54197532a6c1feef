"""Before/after: the server code of two git revisions, side by side on the same model and machine.

    .venv/bin/python bench/compare_revisions.py --before c893572 --after HEAD

Each revision is checked out into a temporary git worktree (``.`` means the working tree as it
is) and served with this checkout's virtual environment and ``models/``, so only the server code
differs. Both servers run at once; gRPC Classify and HTTP /predict (JPEG) at concurrency 1 and 64
are measured in interleaved rounds (the order flips every round) with ``cnnserve loadtest``.
Prints min/median/max images/s and p50 latency; writes bench/results/compare-revisions.json.
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
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "compare-revisions.json"))
    args = ap.parse_args()
    results: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {
            f"before ({args.before})": checkout(args.before, Path(tmp)),
            f"after ({args.after})": checkout(args.after, Path(tmp)),
        }
        servers = {name: ServerProcess(cwd=tree, model_repository=ROOT / "models") for name, tree in trees.items()}
        try:
            for rnd in range(args.rounds):
                order = list(servers.items()) if rnd % 2 == 0 else list(servers.items())[::-1]
                for name, server in order:
                    for target in ("grpc", "http"):
                        for c in (1, 64):
                            r = run(
                                LoadConfig(
                                    target=target,
                                    address=server.address(target),
                                    concurrency=c,
                                    duration=args.duration,
                                    warmup=0.5,
                                    metrics_address="none",
                                )
                            )["summary"]
                            results.setdefault(f"{target} c={c} images/s", {}).setdefault(name, []).append(
                                r["img_per_s"]
                            )
                            results.setdefault(f"{target} c={c} p50 ms", {}).setdefault(name, []).append(
                                r["latency_ms"]["p50"]
                            )
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        finally:
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
                "rounds": args.rounds,
                "results": summary,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"{'metric':<20}" + "".join(f"{name:>34}" for name in trees))
    for metric, per in summary.items():
        print(
            f"{metric:<20}" + "".join(f"{s['min']:>10.2f} /{s['median']:>9.2f} /{s['max']:>9.2f}" for s in per.values())
        )
    print(f"(min / median / max over {args.rounds} rounds)  wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
