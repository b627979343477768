"""Stopping cleanly: the signals a cluster sends, and DataLoader workers that end with the trainer.

SLURM and torchrun signal every process of a job, DataLoader workers included. The trainer must
outlive that signal long enough to save, so its workers ignore it; but a worker that ignores SIGTERM
for good would keep the trainer from exiting after an error (Python's multiprocessing terminates
its daemonic children with SIGTERM at exit, then joins them: forever). So workers ignore the stop
signals only until the trainer itself is exiting, which `SHUTDOWN` tells them.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from typing import Optional

from restorer.base.cli import tool_name

# Ctrl-C (SIGINT; a terminal sends it to every process of the job, torchrun forwards it again) is a
# stop like the cluster's: every rank agrees, rank 0 saves, one line, exit 0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_shutdown = None


def shutdown_event():
    """The event set when this (trainer) process exits, shared with the workers it forks.

    Its atexit handler is registered after multiprocessing's own, so it runs first (atexit is last
    in, first out): the workers learn that a SIGTERM now means "exit" before they are sent it."""
    global _shutdown
    if _shutdown is None:
        _shutdown = multiprocessing.get_context("fork").Event()
        atexit.register(_shutdown.set)
    return _shutdown


def worker_signals(shutdown, worker_id: int = 0) -> None:
    """worker_init_fn (with functools.partial): ignore SIGUSR1 and Ctrl-C; on SIGTERM exit only if the
    trainer is exiting, so a job-wide SIGTERM lets the trainer save first."""

    def on_sigterm(signum, frame) -> None:
        if shutdown.is_set():
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # (held since the fork: stop_signals_held)


@contextlib.contextmanager
def stop_signals_held():
    """Hold the stop signals in this thread while DataLoader workers are forked: a worker inherits the
    mask and takes them only once worker_signals has set its handlers. (A job-wide SIGTERM that came
    in between killed the new worker outright, and the trainer with it, instead of stopping it.)"""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopRequest:
    """SIGTERM, SIGUSR1 and Ctrl-C (SIGINT) set a flag; the trainer acts on it at the next step
    boundary or inside validation.

    A watchdog exits by force `grace_s` after the signal in case the process never gets to act on
    it (a peer died inside a collective), so it is gone before torchrun or SLURM resort to SIGKILL.
    It never fires while a checkpoint is being written (`saving()`): it waits for the file, and gives
    the process a few seconds more to finish. `restore()` (the run is over) calls it off.

    Python runs a signal handler only when the main thread is between bytecodes, not while it waits
    inside a collective; so the signal also wakes a thread (signal.set_wakeup_fd) that starts the
    watchdog whatever the main thread is doing.
    """

    AFTER_SAVE_S = 5.0

    def __init__(self, grace_s: float):
        self.signal: Optional[str] = None
        self.grace_s = grace_s
        self.peers = "unknown"  # the other ranks, by node (the trainer says), for the watchdog's last line
        self.said = False  # the run's error was said already: the watchdog exits without a line of its own
        self._saving = threading.Lock()
        self._done = threading.Event()
        self._started = threading.Lock()
        self._watching = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        self._wake_w = wake_w
        self._previous_fd = signal.set_wakeup_fd(wake_w)
        threading.Thread(target=self._wakeups, daemon=True, name="stop-wakeup").start()

    def _handle(self, signum, frame) -> None:
        self._on_signal(signum)

    def _wakeups(self) -> None:
        """The C-level signal handler writes each signal's number here, even while the main thread waits."""
        while True:
            try:
                data = os.read(self._wake_r, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in [int(s) for s in STOP_SIGNALS]:
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        with self._started:
            if self.signal is None:
                self.signal = signal.Signals(signum).name
            if not self._watching:
                self._watching = True
                threading.Thread(target=self._watchdog, daemon=True, name="stop-watchdog").start()

    def _watchdog(self) -> None:
        if self._done.wait(self.grace_s):
            return
        while True:
            with self._saving:  # a save in progress ends first: it is the work the signal wants kept
                pass
            if self._done.wait(self.AFTER_SAVE_S):  # and the process gets a moment to finish after it
                return
            if not self._saving.locked():
                if not self.said:
                    print(f"{tool_name()}: error: no step ended within {self.grace_s:g} s of {self.signal}: the other ranks "
                          f"({self.peers}) are gone or stuck; exiting (the last checkpoint is kept)", file=sys.stderr,
                          flush=True)
                os._exit(1)

    def saving(self):
        """Context manager around a checkpoint write."""
        return self._saving

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        """The run is over: call the watchdog off, give the signals back."""
        self._done.set()
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        for fd in (self._wake_w, self._wake_r):
            with contextlib.suppress(OSError):
                os.close(fd)
