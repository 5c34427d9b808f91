"""Entry point of the demo: the audit job on the built-in demo (`sfam demo`, `make demo`).

    python -m jobs.demo [--output demo-output] [--queries 30] [--top-k 10]
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
