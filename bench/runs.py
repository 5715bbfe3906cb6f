"""Timing a set of runs with a progress display: on a GPU one run after another, on the CPU in
interleaved rounds; a tqdm bar on a terminal, plain lines in a log."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

import timing


def time_all(calls: dict, args, progress) -> dict:
    """{run: (forward summary, forward+backward summary)} for {run: (forward, forward+backward)}.
    On a GPU each run is timed alone; on the CPU in interleaved rounds (timing.time_cpu_interleaved).
    progress counts runs; on the CPU each round advances it by a fraction."""
    if args.device == "cuda":
        timings = {}
        for run, fns in calls.items():
            timings[run] = tuple(timing.time_cuda(fn, rep_ms=50 if args.quick else 200, cuda_graphs=args.cuda_graphs)
                                 for fn in fns)
            progress.update(1)
        return timings
    start, rounds, done = progress.n, 2 * args.repeats, [0]

    def tick():  # set, not add: summed fractions overshoot the total in floating point
        done[0] += 1
        progress.n = start + len(calls) * done[0] / rounds
        progress.refresh()

    f = timing.time_cpu_interleaved({r: c[0] for r, c in calls.items()}, args.repeats, tick=tick)
    fb = timing.time_cpu_interleaved({r: c[1] for r, c in calls.items()}, args.repeats, tick=tick)
    return {run: (f[run], fb[run]) for run in calls}


class LineProgress:
    """tqdm's interface as far as this bench uses it, for output that is not a terminal: a plain
    line each time another whole run is done, where tqdm's carriage returns would pile up into one
    unreadable line of a log file."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self._shown, self._start = total, desc, 0, 0, time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.n += n
        self.refresh()

    def refresh(self):
        done = int(self.n + 1e-9)
        if done > self._shown:
            self._shown = done
            print(f"{self.desc}: {done}/{self.total} runs, {time.monotonic() - self._start:.0f} s", file=sys.stderr,
                  flush=True)


def progress_bar(total: int, desc: str):
    if not sys.stderr.isatty():
        return LineProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr,
                bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}]")
