"""Entry point of the audit job: `sfam audit` for `ray job submit` and containers.

    python -m jobs.audit --config cfg.yaml [--set model.metric=dot ...] [--debug]

Connects to the Ray cluster it runs in (`ray job submit`, or RAY_ADDRESS), or starts a
local one. Exit status: 0 done, 1 the audit failed (too many bad rows), 2 a user mistake,
3 the run committed but broke a quality gate, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
