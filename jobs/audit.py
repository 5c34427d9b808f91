"""Entry point of the audit job.

    python -m jobs.audit --config cfg.yaml [--set model.metric=dot ...]

Connects to the Ray cluster it runs in (`ray job submit`, or RAY_ADDRESS), or starts a
local one. Exit status: 0 done, 1 the audit failed (too many bad rows), 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys

import ray

from pipeline.config import ConfigError, add_config_arguments, load_config
from pipeline.distributed.job import AuditFailed, run_audit
from pipeline.io.storage import StorageError
from pipeline.manifest import ManifestError
from pipeline.models.loading import ModelLoadError


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        ray.init(ignore_reinit_error=True, log_to_driver=True)
        summary = run_audit(config)
    except (ConfigError, ManifestError, StorageError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except AuditFailed as error:
        print(f"audit failed: {error}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.audit", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
