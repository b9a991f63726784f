"""Which parameters the guards held back most: the sensitivity report.

The device counts, per parameter and step, what the error-reduction guards did
(spike-clipped gradient elements, update-clipped steps) and measures each
update (its RMS and its size relative to the weights); every commit adds those
to the store's manifest (``param_stats``). This module turns them into a
ranking, a table and a bar chart:

- ``opt.report()`` on a live optimizer (after a synchronize, so the last step
  is counted);
- ``nearstep inspect STORE --sensitivity [--png FILE]`` on a store, without the
  lock, while training runs or afterwards.

What the numbers mean:

- *spike rate*: spike-clipped elements / (elements x updates). A parameter whose
  gradients often jump above ``spike_clip`` standard deviations of their own
  history has a high rate; the guard is doing real work there.
- *update/weight*: ||update|| / ||weight|| of the last step. Large values (above
  about 1e-2 for fine-tuning) mark parameters that move fastest relative to their
  size; ``update_clip`` caps them.
- *update-clipped*: in how many steps ``update_clip`` scaled the parameter's update.

Spike counts need ``Guards(spike_clip=...)`` (after its warm-up); update sizes
need ``Guards(telemetry=True)`` or ``update_clip``. Without them the report
says so instead of showing zeros as if they were measurements.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .store import PARAM_STATS, Manifest
from .trace import save_figure

__all__ = ["ParamSensitivity", "SensitivityReport", "sensitivity_report"]

SortKey = Literal["spike_rate", "update_to_weight", "update_clipped"]


@dataclass(frozen=True, slots=True)
class ParamSensitivity:
    """One parameter's guard statistics.

    Attributes:
        name: the parameter's name.
        numel: its element count.
        updates: how many updates it has had.
        spike_clipped: gradient elements spike-clipped, over all steps.
        spike_rate: ``spike_clipped / (numel * updates)`` (0 before any update).
        update_clipped: steps in which ``update_clip`` scaled its update.
        update_rms: RMS of its last measured update (nan if never measured).
        update_to_weight: ||update|| / ||weight|| of its last measured update (nan likewise).
    """

    name: str
    numel: int
    updates: int
    spike_clipped: int
    spike_rate: float
    update_clipped: int
    update_rms: float
    update_to_weight: float


@dataclass(frozen=True, slots=True)
class SensitivityReport:
    """The per-parameter guard statistics of a store at one committed step.

    Attributes:
        step: the committed optimizer step.
        params: one entry per parameter, in the store's order.
        spike_measured: whether spike clipping counted anything (or ran at all).
        updates_measured: whether update sizes were measured (telemetry or update_clip).
    """

    step: int
    params: tuple[ParamSensitivity, ...]
    spike_measured: bool
    updates_measured: bool

    def ranked(self, by: SortKey = "spike_rate", top: int | None = None) -> list[ParamSensitivity]:
        """Parameters by ``by``, largest first (unmeasured values last)."""
        if by not in ("spike_rate", "update_to_weight", "update_clipped"):
            raise ValueError(f"by must be 'spike_rate', 'update_to_weight' or 'update_clipped', got {by!r}")

        def key(p: ParamSensitivity) -> float:
            value = float(getattr(p, by))
            return -math.inf if math.isnan(value) else value

        rows = sorted(self.params, key=key, reverse=True)
        return rows if top is None else rows[:top]

    def table(self, top: int = 15) -> str:
        """A text table of the ``top`` parameters by spike rate and by update/weight."""
        lines = [f"sensitivity at step {self.step}: {len(self.params)} parameters"]
        if not (self.spike_measured or self.updates_measured):
            lines.append(
                "no guard statistics yet: train with nearstep.Guards(spike_clip=..., telemetry=True) "
                "(or update_clip=...) for at least one step past spike_warmup"
            )
            return "\n".join(lines)
        header = f"{'parameter':<48} {'numel':>11} {'spike rate':>11} {'spiked':>10} {'upd/weight':>11} {'upd-clipped':>11}"
        for by, title, measured in (("spike_rate", "most spike-clipped", self.spike_measured),
                                    ("update_to_weight", "largest update relative to weight", self.updates_measured)):
            lines.append("")
            if not measured:
                why = "spike_clip is off or still in warm-up" if by == "spike_rate" else "telemetry and update_clip are off"
                lines.append(f"{title}: not measured ({why})")
                continue
            lines += [f"{title}:", header]
            for p in self.ranked(by, top):  # type: ignore[arg-type]
                lines.append(
                    f"{_short(p.name, 48):<48} {p.numel:>11,} {p.spike_rate:>11.2e} {p.spike_clipped:>10,} "
                    f"{_num(p.update_to_weight):>11} {p.update_clipped:>11,}"
                )
        return "\n".join(lines)

    def plot(self, path: str | Path, top: int = 20) -> Path:
        """A PNG with two bar charts: the ``top`` parameters by spike rate and by update/weight.

        Needs matplotlib (``pip install matplotlib``); raises ImportError saying so.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the sensitivity chart needs matplotlib: pip install matplotlib") from exc
        panels = (("spike_rate", "spike-clipped fraction of elements", self.spike_measured, "#c44e52"),
                  ("update_to_weight", "last ||update|| / ||weight||", self.updates_measured, "#4c72b0"))
        fig, axes = plt.subplots(1, 2, figsize=(13, 1.5 + 0.28 * top), squeeze=False)
        for ax, (by, label, measured, color) in zip(axes[0], panels):
            rows = self.ranked(by, top) if measured else []  # type: ignore[arg-type]
            values = [float(getattr(p, by)) for p in rows]
            ax.barh(range(len(rows)), [0.0 if math.isnan(v) else v for v in values], color=color)
            ax.set_yticks(range(len(rows)), [_short(p.name, 40) for p in rows], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            if not measured:
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center")
        fig.suptitle(f"nearstep sensitivity at step {self.step}")
        return save_figure(fig, path)

    def to_dict(self) -> dict[str, Any]:
        def clean(row: ParamSensitivity) -> dict[str, Any]:
            return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(row).items()}

        return {"step": self.step, "spike_measured": self.spike_measured, "updates_measured": self.updates_measured,
                "params": [clean(p) for p in self.params]}


def sensitivity_report(manifest: Manifest) -> SensitivityReport:
    """The report of a store's last commit (``Store.manifest`` or ``read_manifest``)."""
    n = len(manifest.params)
    stats = {name: manifest.param_stats.get(name) for name in PARAM_STATS}
    spiked = stats["spike_clipped"] or [0.0] * n
    clipped = stats["update_clipped"] or [0.0] * n
    rms = stats["update_rms"] or [math.nan] * n
    ratio = stats["update_to_weight"] or [math.nan] * n
    rows = []
    for i, p in enumerate(manifest.params):
        updates = manifest.param_steps[i]
        # A parameter whose update was never measured keeps 0.0 in the manifest's lists
        # only when another parameter was measured; its ratio is then unknown, not 0.
        measured = stats["update_rms"] is not None and rms[i] > 0
        rows.append(ParamSensitivity(
            name=p.name, numel=p.numel, updates=updates, spike_clipped=int(spiked[i]),
            spike_rate=spiked[i] / (p.numel * updates) if updates and p.numel else 0.0,
            update_clipped=int(clipped[i]),
            update_rms=rms[i] if measured else math.nan,
            update_to_weight=ratio[i] if measured else math.nan,
        ))
    spike_measured = manifest.counters.get("spike_checked", 0) > 0
    updates_measured = any(not math.isnan(r.update_rms) for r in rows)
    return SensitivityReport(manifest.step, tuple(rows), spike_measured, updates_measured)


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2e}"


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
