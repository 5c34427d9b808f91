"""The project's errors and the exit status each one means.

Every error the pipeline raises on purpose derives from :class:`PipelineError`:

    UserError      the input is wrong (config, manifest, storage, credentials, model,
                   layers, image); the message names the thing and why. Exit 2.
    AuditFailed    the job ran, but its result is not acceptable (too many bad rows). Exit 1.
    GatesFailed    the run finished and committed, but broke a quality gate (gates.py). Exit 3.

Ctrl-C (KeyboardInterrupt) is exit 130; SIGTERM (a scheduler or Kubernetes stopping the job,
raised as :class:`Terminated` by the command line) is exit 143. A reader of the standard output
that goes away early (`sfam render -o - | head -c 8`) is exit 141, without a message.

The command line prints each as one line, `<prefix>: <message>`, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_AUDIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_GATES_FAILED = 3
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), the shell's convention
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15, as a shell reports a process the signal ended
EXIT_BROKEN_PIPE = 141  # the reader of the standard output went away (`| head`): 128 + SIGPIPE


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: it stops the work by the paths Ctrl-C takes (an audit's
    attempt is recorded as failed), and the command line exits 143."""

    raised = False  # whether the command line's SIGTERM handler raised one in the command that runs


def as_sent(stop: KeyboardInterrupt) -> KeyboardInterrupt:
    """The stop as its signal sent it. Ray's blocking calls (ray.get, ray.wait) re-raise a stop
    raised inside them as a plain KeyboardInterrupt: once SIGTERM raised a Terminated, that is
    a Terminated again."""
    if Terminated.raised and not isinstance(stop, Terminated):
        return Terminated("stopped by SIGTERM")
    return stop


class PipelineError(Exception):
    """Base of the errors this project raises on purpose."""

    exit_code = EXIT_AUDIT_FAILED
    prefix = "error"  # how the command line introduces the message


class UserError(PipelineError):
    """A mistake in what the user gave: the message names the thing and the reason."""

    exit_code = EXIT_USER_ERROR


class AuditFailed(PipelineError):
    """The job ran but its result is not acceptable (too many failed rows, rows missing)."""

    exit_code = EXIT_AUDIT_FAILED
    prefix = "audit failed"


def did_you_mean(name: str, candidates: Iterable[str], n: int = 5, cutoff: float = 0.6, prefix: str = "") -> str:
    """"; did you mean: a, b?" with up to n candidates close to `name` (each shown after `prefix`), or "".

    For the end of an error message about a name that does not exist.
    """
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=cutoff)
    return f"; did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
