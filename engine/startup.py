"""Time to the first step: where the seconds from launch to a run's first optimizer step go (printed once and
logged under startup/), so that a slow start, or a restart after preemption that spends minutes before
training, shows what to fix."""

from __future__ import annotations

import time

import psutil


class StartupClock:
    """Laps of the startup: `lap(name)` charges the time since the previous lap to `name`. The first lap,
    "launch", runs from the process's creation: imports and the config."""

    def __init__(self):
        self.seconds = {"launch": time.time() - psutil.Process().create_time()}
        self._last = time.perf_counter()
        self.done = False

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def finish(self) -> dict[str, float]:
        """After the first optimizer step: the laps as scalars."""
        self.done = True
        self.lap("first step")
        return {f"startup/{name.replace(' ', '_')}_s": s for name, s in self.seconds.items()} | {
            "startup/total_s": sum(self.seconds.values())}

    def line(self) -> str:
        laps = ", ".join(f"{name} {s:.1f}" for name, s in self.seconds.items())
        return f"first step {sum(self.seconds.values()):.1f} s after launch ({laps})"
