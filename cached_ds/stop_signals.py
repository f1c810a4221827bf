"""Stopping a run cleanly when the scheduler asks: SIGTERM (SLURM's preemption and ``scancel``,
which torchrun and the deepspeed launcher pass on to their ranks). Without it a preempted run dies
mid-step and loses everything since its last checkpoint. With it the run finishes the step it is
in, saves a checkpoint, says so, and exits with 143 (128 + SIGTERM); a requeued job with
``--resume auto`` continues from there. A SIGTERM that arrives after the last step's check (during
the final save, export or evaluation) is acted on as soon as the ``with`` block ends: by SIGTERM's
own default action, as if it had never been caught; the requeue redoes that part.

Not SIGUSR1 (``sbatch --signal=USR1@...``): torchrun does not handle it and dies of it, leaving
its ranks to be killed mid-step.

    with StopSignals() as stop:
        for step in ...:
            train_step()
            if stop.requested():   # a collective: every rank calls it after every step
                save(); raise stop.exit()
"""

from __future__ import annotations

import os
import signal
import threading

from .distributed import max_over_ranks, world_size

SIGNALS = (signal.SIGTERM,)


class StopSignals:
    def __init__(self):
        self.received = 0  # the signal number this rank got, 0 for none
        self.agreed = 0  # the largest any rank got, once requested() has seen one
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in SIGNALS:
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        if self.received and not self.agreed:  # caught after the last check: act on it now
            os.kill(os.getpid(), self.received)

    def _record(self, number, frame) -> None:
        self.received = self.received or number

    def requested(self) -> bool:
        """Whether any rank got a stop signal (every rank calls this at the same step)."""
        self.agreed = max_over_ranks(self.received) if world_size() > 1 else self.received
        return self.agreed > 0

    def exit(self) -> SystemExit:
        return SystemExit(128 + self.agreed)

    def name(self) -> str:
        return signal.Signals(self.agreed).name
