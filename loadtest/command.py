"""The ``cnnserve loadtest`` command: run, print, write JSON/CSV, exit status."""

from __future__ import annotations

import argparse
import sys

from loadtest.arguments import config_from_args
from loadtest.config import LoadTestError
from loadtest.report import append_csv, format_report, write_json
from loadtest.runner import run


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        report = run(cfg)
    except (LoadTestError, ValueError) as e:
        print(f"cnnserve loadtest: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnserve loadtest: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json_path:
        write_json(report, args.json_path)
    if args.csv_path:
        append_csv(report, args.csv_path)
    s = report["summary"]
    if s["ok"] == 0:
        print("cnnserve loadtest: no request succeeded", file=sys.stderr)
        return 1
    if args.fail_on_error and s["errors"]:
        return 1
    return 0
