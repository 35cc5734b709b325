"""Stopping for a scheduler: a signal (SLURM's warning `--signal=USR1@120`, a preemption's SIGTERM, Ctrl-C) asks
the run to stop; every rank finishes its step, they agree on the step at the next logging step, save one
checkpoint there and exit with REQUEUE_EXIT_CODE, leaving REQUEUE_MARKER in output_dir for the launch script
(`accelerate launch` turns every failing rank's exit code into 1). docs/cluster.md has the whole story.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from data.loader import STOP_SIGNALS_HANDLED

# EX_TEMPFAIL of sysexits.h: "a temporary failure, the user is invited to retry" (tools/slurm/job.sh requeues).
REQUEUE_EXIT_CODE = 75
REQUEUE_MARKER = "requeue.json"


class Preempted(SystemExit):
    """Raised by the trainer after it saved the checkpoint of a signalled stop: the process exits with
    REQUEUE_EXIT_CODE, without a traceback, through every caller."""

    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


def signal_numbers(names: list[str]) -> list[signal.Signals]:
    """`train.stop_signals` as signals: ["SIGTERM", "USR1", ...]; an unknown name raises ValueError."""
    found = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if not hasattr(signal.Signals, full):
            raise ValueError(f"train.stop_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1, SIGINT)")
        found.append(signal.Signals[full])
    return found


class StopRequest:
    """While active, the given signals only record that a stop was asked for: a handler must not block or talk
    to other ranks (it runs between two bytecodes of the loop, perhaps inside a collective). Meanwhile data
    loader workers ignore these signals (data.loader.STOP_SIGNALS_HANDLED), so one sent to a whole process tree
    (as SLURM sends it) does not kill them. A second Ctrl-C interrupts at once, as users expect; the save is
    atomic, so the previous checkpoint stays."""

    def __init__(self, signals: list[signal.Signals]):
        self.signals, self._previous = signals, {}
        self.received: signal.Signals | None = None

    def __enter__(self) -> StopRequest:
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        STOP_SIGNALS_HANDLED.value = True
        return self

    def __exit__(self, *exc) -> None:
        STOP_SIGNALS_HANDLED.value = False
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(number)
            print(f"{self.received.name}: stopping after the next logging step, with a checkpoint", file=sys.stderr,
                  flush=True)


def write_marker(output_dir: Path, step: int, signal_name: str, checkpoint: Path) -> None:
    """The launch script's evidence that the run stopped to be requeued (not that it failed)."""
    (output_dir / REQUEUE_MARKER).write_text(json.dumps(
        {"step": step, "signal": signal_name, "checkpoint": checkpoint.name, "time": time.time()}) + "\n")


def clear_marker(output_dir: Path) -> None:
    """At start: a marker is only ever about the latest run."""
    (output_dir / REQUEUE_MARKER).unlink(missing_ok=True)
