"""Stopping a command: Ctrl-C and SIGTERM become exceptions in the main thread (stop_signals), a
second one is ignored so that the first's clean-up runs to its end, and Ray is shut down before
the command's last line (shut_down_ray)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import Terminated

RAY_DATA_STOP_SECONDS = 30  # the longest a stop waits for Ray Data's executor before shutting Ray down
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the command stops, an audit's attempt is recorded as failed
REDELIVERY_SECONDS = 0.05  # after a stop lost in a finalizer: long enough for the finalizer to return


@contextmanager
def stop_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt and Terminated in the main thread while the block
    runs (elsewhere Python's own handling stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {number: signal.signal(number, _stop) for number in STOP_SIGNALS}
    redelivery = _LostStopRedelivery(sys.unraisablehook)
    sys.unraisablehook = redelivery
    try:
        yield
    finally:
        Terminated.raised = False
        redelivery.close()
        sys.unraisablehook = redelivery.hook
        for number, handler in handlers.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _stop(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: stops the command; a second one is ignored, so that it cannot cut short
    the clean-up the first started (recording the attempt as failed, stopping Ray's processes)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if signum == signal.SIGTERM:
        Terminated.raised = True
        raise Terminated("stopped by SIGTERM")
    raise KeyboardInterrupt


class _LostStopRedelivery:
    """sys.unraisablehook while stop_signals' block runs. A stop that _stop raised inside a finalizer
    (`__del__`, a weakref callback) is lost there: Python prints "Exception ignored" and goes on,
    and the signals _stop ignores from then on would never stop the command. The same holds for
    the SystemExit that Ray's driver handler raises for SIGTERM while ray.init runs, where it lands
    in the at-fork hooks of the processes ray.init starts. The signal is sent to the main thread
    again, from another thread, once this hook and the finalizer have returned (a real signal,
    which also wakes a sleep or a wait; one that lands in a finalizer again comes back here),
    unless the block has ended by then."""

    def __init__(self, hook: Callable[[Any], None]) -> None:
        self.hook = hook  # the one it replaces, for every other unraisable exception
        self._lock = threading.Lock()
        self._active = True

    def __call__(self, unraisable: Any) -> None:
        signum = _lost_stop(unraisable.exc_value)
        if signum is None or threading.current_thread() is not threading.main_thread():
            self.hook(unraisable)
            return
        signal.signal(signum, signal.SIG_IGN)  # _stop's already is; Ray's handler could raise again in this hook
        _release_logging_lock_held_by_fork(unraisable)
        threading.Thread(target=self._send_soon, args=(signum,), daemon=True).start()
        signal.signal(signum, _stop)  # last: until now the signal is ignored, so it cannot land in this hook

    def _send_soon(self, signum: int) -> None:
        time.sleep(REDELIVERY_SECONDS)
        with self._lock:
            if self._active:  # _stop still handles it: never after the block, under the caller's handlers
                signal.pthread_kill(threading.main_thread().ident, signum)

    def close(self) -> None:
        with self._lock:
            self._active = False


def _release_logging_lock_held_by_fork(unraisable: Any) -> None:
    """logging takes its module lock before a fork and releases it after, in an at-fork hook; a stop
    raised as that hook began left the lock held, and every other thread that then took it (a new
    logger, a level not looked up yet: Ray's threads among them) would wait for it for ever."""
    lock = getattr(logging, "_lock", None)
    if unraisable.object is getattr(logging, "_releaseLock", None) and lock is not None and lock._is_owned():
        lock.release()


def _lost_stop(exception: BaseException | None) -> signal.Signals | None:
    """The stop signal that raised this exception: _stop's or Ray's driver handler's (sys.exit(SIGTERM))."""
    if isinstance(exception, KeyboardInterrupt):
        return signal.SIGTERM if isinstance(exception, Terminated) else signal.SIGINT
    if isinstance(exception, SystemExit) and exception.code == signal.SIGTERM:
        return signal.SIGTERM
    return None


def shut_down_ray() -> None:
    """Stops this process's Ray now, as the stop signals are ignored, rather than at exit, where a
    second Ctrl-C would interrupt it (a traceback, and Ray's agents left running).

    Ray Data's executor, told to stop, may still be scheduling (it waits 2 s for that, then goes
    on); Ray ends the process at once, status 1, when that thread calls it after the shutdown
    ("The core worker has already been shutdown"), so it is waited for first.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    deadline = time.monotonic() + RAY_DATA_STOP_SECONDS
    for thread in threading.enumerate():
        if thread.name.startswith("StreamingExecutor-"):  # Ray Data's own name for its executor's thread
            thread.join(max(0.0, deadline - time.monotonic()))
    ray.shutdown()

