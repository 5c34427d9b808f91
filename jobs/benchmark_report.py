"""What the benchmark scripts share: BENCHMARKS.md, where each owns one `## ` section, and the CPU."""

from __future__ import annotations

import argparse
import platform
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or "unknown CPU"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def verdict(met: bool | None) -> str:
    """A target's column: met, MISSED, or empty where there is no target."""
    return "" if met is None else "met" if met else "MISSED"


def write_section(path: Path, section: str) -> None:
    """Replaces the section headed by `section`'s first line (up to the next `## `), or appends it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = re.escape(section.splitlines()[0])
    existing = re.compile(rf"^{heading}\n.*?(?=^## |\Z)", re.M | re.S)
    if existing.search(text):
        text = existing.sub(lambda _match: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: list[str], smoke: dict, section: str) -> argparse.Namespace:
    """Adds --smoke (the tests' tiny run, `smoke` as defaults) and --write, then parses `argv`."""
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests: " + ", ".join(
        f"{key}={value}" for key, value in smoke.items()))
    parser.add_argument("--write", action="store_true", help=f"update the {section} section of {BENCHMARKS.name}")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)
