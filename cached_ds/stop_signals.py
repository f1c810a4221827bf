"""Stopping a run cleanly when the scheduler asks: SIGTERM (SLURM's preemption and ``scancel``,
torchrun passing on its own SIGTERM) or SIGUSR1 (``sbatch --signal=USR1@120``, a warning ahead of
the time limit). Without it a preempted run dies mid-step and loses everything since its last
checkpoint. With it the run finishes the step it is in, saves a checkpoint, says so, and exits
with 128 + the signal number; a requeued job with ``--resume auto`` continues from there.

    with StopSignals() as stop:
        for step in ...:
            train_step()
            if stop.requested():   # a collective: every rank calls it after every step
                save(); raise stop.exit()
"""

from __future__ import annotations

import signal
import threading

from .distributed import all_reduce_sum

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number, frame) -> None:
        self.received = self.received or number

    def requested(self) -> bool:
        """Whether any rank got a stop signal (every rank calls this at the same step)."""
        return all_reduce_sum(1.0 if self.received else 0.0) > 0

    def exit(self) -> SystemExit:
        number = self.received or signal.SIGTERM
        return SystemExit(128 + int(number))

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a stop signal on another rank"
