"""Timelines of both processes: lanes, Chrome/Perfetto JSON, an overlap summary, a PNG.

Events carry CLOCK_MONOTONIC nanoseconds (``time.monotonic_ns``), which every
process on the machine shares, so host and device events line up without any
clock exchange. Lanes:

- ``compute``: the training loop's forward/backward between two ``step()`` calls,
  ``step`` (host time inside ``step()``) and ``wait`` (the loop blocked on the device);
- ``link``: gradients copied into staging, new weights copied into the model;
- ``device-io``: store reads, writes and commits;
- ``device-compute``: the update kernels.
"""

from __future__ import annotations

import json
import threading
from collections import deque
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .protocol import Lane, TraceEvent

__all__ = ["LANES", "Trace", "TraceEvent", "merge_intervals", "overlap_summary", "plot_timelines", "save_figure"]

LANES = tuple(Lane)
_DEVICE_LANES = (Lane.DEVICE_IO, Lane.DEVICE_COMPUTE)


def merge_intervals(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of [start, end) intervals as a sorted list of disjoint ones."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _measure(intervals: Sequence[tuple[int, int]]) -> int:
    return sum(end - start for start, end in intervals)


def _intersect(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for start, end in a:
        cursor = start
        for bs, be in b:
            if be <= cursor or bs >= end:
                continue
            if bs > cursor:
                out.append((cursor, bs))
            cursor = max(cursor, be)
        if cursor < end:
            out.append((cursor, end))
    return out


def overlap_summary(events: Sequence[TraceEvent]) -> dict[str, float]:
    """How much device time was hidden behind the training loop's own work.

    ``overlap_fraction`` = time the device was busy while the loop was computing
    (forward/backward, not waiting) / time the device was busy.
    """
    device = merge_intervals((e.start_ns, e.end_ns) for e in events if e.lane in _DEVICE_LANES)
    compute = merge_intervals((e.start_ns, e.end_ns) for e in events if e.lane == Lane.COMPUTE and e.name == "forward/backward")
    waits = merge_intervals((e.start_ns, e.end_ns) for e in events if e.lane == Lane.COMPUTE and e.name.startswith("wait"))
    working = _subtract(compute, waits)
    busy = _measure(device)
    hidden = _measure(_intersect(device, working))
    return {
        "device_busy_seconds": busy / 1e9,
        "device_hidden_seconds": hidden / 1e9,
        "compute_seconds": _measure(working) / 1e9,
        "wait_seconds": _measure(waits) / 1e9,
        "overlap_fraction": hidden / busy if busy else 0.0,
    }


class Trace:
    """Timeline events of one optimizer: the host's own and, on collection, the device's.

    ``opt.trace.save("trace.json")`` writes Chrome/Perfetto trace JSON (open it at
    ui.perfetto.dev or chrome://tracing); :meth:`summary` gives the overlap numbers.
    """

    def __init__(self, collect: Callable[[], list[TraceEvent]] | None = None, capacity: int = 100_000) -> None:
        # The latest ``capacity`` events (about 7,000 steps of a model in two slices; ~15 MB): a
        # run of millions of steps keeps a bounded window, not a growing list.
        self._events: deque[TraceEvent] = deque(maxlen=capacity)
        self._collect = collect
        self._capacity = capacity
        self._lock = threading.Lock()
        self.enabled = True
        # When the training loop's current forward/backward began (the end of the last step()).
        self.loop_start_ns: int | None = None

    def add(self, lane: Lane, name: str, start_ns: int, end_ns: int) -> None:
        if self.enabled:
            with self._lock:
                self._events.append(TraceEvent(lane, name, start_ns, end_ns))

    def events(self) -> list[TraceEvent]:
        """Every event so far, device events included, sorted by start."""
        self.collect()
        with self._lock:
            return sorted(self._events, key=lambda e: e.start_ns)

    def collect(self) -> None:
        """Move the device's events into this trace (dropped while ``enabled`` is False): the
        optimizer calls it every few hundred steps, so the device's buffer stays small."""
        if self._collect is not None:
            fresh = self._collect()
            if self.enabled:
                with self._lock:
                    self._events.extend(fresh)

    def clear(self) -> None:
        """Forget every event so far; the next forward/backward counts from now."""
        self.events()  # drain the device's buffer too
        with self._lock:
            self._events.clear()
            if self.loop_start_ns is not None:
                self.loop_start_ns = time.monotonic_ns()

    def summary(self) -> dict[str, float]:
        return overlap_summary(self.events())

    def to_chrome(self) -> dict[str, Any]:
        events = self.events()
        origin = events[0].start_ns if events else 0
        lanes = {lane: i for i, lane in enumerate(LANES)}
        out: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "nearstep"}},
        ]
        for lane, tid in lanes.items():
            out.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": lane}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": tid, "args": {"sort_index": tid}})
        for e in events:
            out.append({
                "ph": "X", "pid": 1, "tid": lanes.get(e.lane, len(lanes)), "name": e.name, "cat": e.lane,
                "ts": (e.start_ns - origin) / 1e3, "dur": max(e.end_ns - e.start_ns, 0) / 1e3,
            })
        return {"traceEvents": out, "displayTimeUnit": "ms"}

    def save(self, path: str | Path) -> Path:
        """Write Chrome/Perfetto trace JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_chrome()))
        return path


def plot_timelines(rows: Sequence[tuple[str, Sequence[TraceEvent]]], path: str | Path, title: str = "") -> Path:
    """A PNG with one panel per (label, events): lanes as rows, events as bars.

    Needs matplotlib (``pip install matplotlib``); raises ImportError saying so.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the timeline PNG needs matplotlib: pip install matplotlib") from exc
    colors = {Lane.COMPUTE: "#4c72b0", Lane.LINK: "#dd8452", Lane.DEVICE_IO: "#55a868", Lane.DEVICE_COMPUTE: "#c44e52"}
    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 1.6 + 1.4 * len(rows)), squeeze=False)
    for ax, (label, events) in zip(axes[:, 0], rows):
        origin = min((e.start_ns for e in events), default=0)
        for y, lane in enumerate(LANES):
            spans = [((e.start_ns - origin) / 1e6, max(e.end_ns - e.start_ns, 1) / 1e6) for e in events
                     if e.lane == lane and not e.name.startswith("wait")]
            ax.broken_barh(spans, (y - 0.4, 0.8), color=colors[lane])
            if lane == Lane.COMPUTE:
                waits = [((e.start_ns - origin) / 1e6, (e.end_ns - e.start_ns) / 1e6) for e in events
                         if e.lane == lane and e.name.startswith("wait")]
                ax.broken_barh(waits, (y - 0.4, 0.8), color="#bbbbbb", hatch="//")
        ax.set_yticks(range(len(LANES)), LANES)
        ax.invert_yaxis()
        ax.set_title(label, loc="left", fontsize=10)
        ax.set_xlabel("ms")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out a matplotlib figure, write it as a PNG (making the folder), close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
