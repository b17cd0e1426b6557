"""How a run ends: its ``status`` (printed as ``status=`` and stored in ``summary.json``), the
exit code of each, and the signals that end a run early.

======================  =====  ==========================================================
status                  code   meaning
======================  =====  ==========================================================
``ok``                  0      trained to ``trainer.max_steps`` and validated
(config error)          2      bad config or input: one ``error:`` line, before any work
``failed``              1      any other exception (traceback, then the summary)
``diverged``            3      ``trainer.max_bad_steps`` non-finite steps in a row
``interrupted``         130    SIGINT (Ctrl-C) once: stopped at the next step boundary
``preempted``           143    SIGTERM: stopped at the next step boundary
======================  =====  ==========================================================

A signal during training only sets a flag: the run stops at the next optimizer-step boundary
(or at the end of a validation in progress), saves ``on_exception.ckpt`` there and prints the
summary without validating. Outside the training loop (start-up, validation before or after
fit) it stops at once. A second SIGINT interrupts immediately; a second SIGTERM is ignored (the
scheduler's SIGKILL follows).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

EXIT_CODES: Dict[str, int] = {
    "ok": 0,
    "failed": 1,
    "config_error": 2,
    "diverged": 3,
    "interrupted": 130,
    "preempted": 143,
}
SIGNAL_STATUS = {signal.SIGTERM: "preempted", signal.SIGINT: "interrupted"}


class RunStopped(Exception):
    """A run that ended early on purpose; ``status`` is one of :data:`EXIT_CODES`."""

    status = "failed"


class Preempted(RunStopped):
    """SIGTERM or SIGINT: stop now, keep a checkpoint of the last finished step."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.status = SIGNAL_STATUS.get(signum, "preempted")
        super().__init__(f"received {signal.Signals(signum).name}")


class Diverged(RunStopped):
    """Too many non-finite steps in a row (``trainer.max_bad_steps``)."""

    status = "diverged"


class StopSignals:
    """SIGTERM / SIGINT handling of one run (see the module docstring). ``deferred`` is true
    while the training loop runs, where a signal is acted on at a step boundary only."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.deferred = False

    def handler(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # a second signal
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if not self.deferred:
            raise Preempted(signum)

    def install(self) -> None:
        """(Re)install the handlers; Lightning replaces the SIGTERM handler when fit starts."""
        for signum in SIGNAL_STATUS:
            signal.signal(signum, self.handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None


_ACTIVE: Optional[StopSignals] = None


def active() -> Optional[StopSignals]:
    """The signal state of the run in progress (None outside :func:`handle_signals`)."""
    return _ACTIVE


@contextmanager
def handle_signals() -> Iterator[StopSignals]:
    """Handle SIGTERM and SIGINT as stop requests for the duration of a run (main thread only;
    elsewhere, e.g. a run inside a thread, signals keep their default behaviour)."""
    global _ACTIVE
    import threading

    state = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {s: signal.getsignal(s) for s in SIGNAL_STATUS}
    _ACTIVE = state
    state.install()
    try:
        yield state
    finally:
        _ACTIVE = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM/SIGINT, so a signal to the whole
    process group (SLURM, Kubernetes, Ctrl-C) is handled by the main process alone."""
    for signum in SIGNAL_STATUS:
        signal.signal(signum, signal.SIG_IGN)
