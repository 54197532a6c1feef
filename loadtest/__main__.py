"""``python -m loadtest ...``: the same command as ``cnnserve loadtest ...``."""

import argparse
import sys

from loadtest.arguments import add_arguments
from loadtest.command import main

parser = argparse.ArgumentParser(prog="python -m loadtest")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
