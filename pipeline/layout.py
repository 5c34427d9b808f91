"""Where a run's outputs go, and names that are safe to use as paths.

    {output}/results/run_date=YYYY-MM-DD/run_id=ID/part-ATTEMPT-*.parquet   the result table
    {output}/png/run_id=ID/attempt=ATTEMPT/{shard}/{safe_pair_id}.png      overlays
    {output}/runs/ID/run.json, {output}/runs/ID/_SUCCESS                   the committed attempt
    {output}/runs/ID/attempts/ATTEMPT/run.json                             every attempt's record
    {output}/runs/ID/attempts/ATTEMPT/results/part-*.parquet               rows while staged
    {output}/reports/ID.html (and ID_overlays/ for overlays copied beside it)  `sfam report`'s default
    {output}/comparisons/A/B/                                              `sfam compare A B`

Each execution of a run_id is an attempt with its own id; `_SUCCESS` names the attempt
whose rows are the run's rows (see pipeline/io/results_store.py for the commit).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass

from pipeline.io.storage import join_uri

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 80


def safe_name(pair_id: str) -> str:
    """A file name derived from an untrusted pair_id: stable, unique and inside its folder.

    Keeps a readable sanitised prefix and appends a hash of the full id, so ids that sanitise
    alike ('a/b', 'a?b') or are long still get distinct names.
    """
    digest = hashlib.sha256(pair_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    readable = _UNSAFE.sub("_", pair_id).strip("._-")[:MAX_NAME]  # no leading '-': not an option to a shell tool
    return f"{readable}-{digest}" if readable else digest


@dataclass(frozen=True)
class RunLayout:
    output: str
    run_id: str
    run_date: str  # YYYY-MM-DD
    attempt: str

    @property
    def results_root(self) -> str:
        return join_uri(self.output, "results")

    @property
    def results_dir(self) -> str:
        return join_uri(self.results_root, f"run_date={self.run_date}", f"run_id={self.run_id}")

    @property
    def png_root(self) -> str:
        """The overlays of every attempt of the run."""
        return join_uri(self.output, "png", f"run_id={self.run_id}")

    @property
    def png_dir(self) -> str:
        return join_uri(self.png_root, f"attempt={self.attempt}")

    def png_uri(self, pair_id: str) -> str:
        name = safe_name(pair_id)
        return join_uri(self.png_dir, name[-2:], f"{name}.png")

    @property
    def report(self) -> str:
        """Where `sfam report` writes the run's report by default; a commit deletes a stale one."""
        return default_report(self.output, self.run_id)

    @property
    def run_dir(self) -> str:
        return run_dir_uri(self.output, self.run_id)

    @property
    def run_record(self) -> str:
        return run_record_uri(self.output, self.run_id)

    @property
    def success_marker(self) -> str:
        return success_marker_uri(self.output, self.run_id)

    @property
    def attempt_dir(self) -> str:
        return attempt_dir_uri(self.output, self.run_id, self.attempt)

    @property
    def attempt_record(self) -> str:
        return attempt_record_uri(self.output, self.run_id, self.attempt)

    @property
    def staged_results_dir(self) -> str:
        return join_uri(self.attempt_dir, "results")

    @property
    def part_prefix(self) -> str:
        """File names of the attempt's parts start with this, wherever they are."""
        return part_prefix(self.attempt)


def part_prefix(attempt: str) -> str:
    """File names of an attempt's result parts start with this."""
    return f"part-{attempt}-"


def run_dir_uri(output: str, run_id: str) -> str:
    """The run's folder: its records and its attempts' staging."""
    return join_uri(output, "runs", run_id)


def run_record_uri(output: str, run_id: str) -> str:
    """The run's record (run.json): its committed attempt's, or its latest failure's."""
    return join_uri(run_dir_uri(output, run_id), "run.json")


def attempt_dir_uri(output: str, run_id: str, attempt: str) -> str:
    """An attempt's folder: its record and its staged rows."""
    return join_uri(run_dir_uri(output, run_id), "attempts", attempt)


def attempt_record_uri(output: str, run_id: str, attempt: str) -> str:
    """An attempt's own record, which it writes as it starts and ends (run.json is the run's)."""
    return join_uri(attempt_dir_uri(output, run_id, attempt), "run.json")


def success_marker_uri(output: str, run_id: str) -> str:
    """`_SUCCESS`, which names the run's committed attempt."""
    return join_uri(run_dir_uri(output, run_id), "_SUCCESS")


def default_report(output: str, run_id: str) -> str:
    return join_uri(output, "reports", f"{run_id}.html")


def comparison_dir(output: str, run_a: str, run_b: str) -> str:
    """`sfam compare`'s files of runs A and B (either may be a glob's `*`: run ids hold no glob characters)."""
    return join_uri(output, "comparisons", run_a, run_b)


def overlay_copies(report: str) -> str:
    """The folder beside a report that holds the overlays copied from another filesystem."""
    return report.rsplit(".", 1)[0] + "_overlays"


def new_attempt_id() -> str:
    """A sortable, unique attempt id: the UTC start time and a random suffix."""
    now = dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
