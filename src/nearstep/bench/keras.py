"""``nearstep bench keras``: ``model.fit`` with nearstep.keras.AdamW against keras.optimizers.AdamW.

The same Keras MLP, data and seed under each optimizer, alternating in rounds
(A B A B ...) in one process: Keras' own AdamW (moments in host memory as Keras
variables) and nearstep.keras.AdamW (moments in a store, the update on the
emulated device pinned to the last core) in sync mode; with ``--backend torch``
also nearstep.keras.AdamW in overlap mode, whose update runs while Keras goes on
to the next batch (TensorFlow cannot overlap it: docs/keras.md says why). On
TensorFlow a step is timed from Keras' ``on_train_batch_begin`` to its
``on_train_batch_end``; on torch from one ``on_train_batch_end`` to the next, so
that the time between batches, where the overlapped update runs, is counted
too. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

from nearstep.bench.report import machine, scratch, table_line

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nearstep bench keras", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--backend", choices=("tensorflow", "torch"), default="tensorflow",
                        help="Keras backend (default tensorflow)")
    parser.add_argument("--width", type=int, default=2048, help="width of the MLP's square Dense layers (default 2048)")
    parser.add_argument("--layers", type=int, default=4, help="Dense layers (default 4: about 17M parameters)")
    parser.add_argument("--batch", type=int, default=64, help="examples per step (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, each round (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both optimizers, alternating (default 3)")
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path(".nearstep/bench-keras"),
                        help="scratch directory for the stores (default ./.nearstep/bench-keras)")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("bench-keras.json"), help="results file")
    parser.add_argument("--quick", action="store_true", help="smoke test: width 64, 2 steps, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.steps, args.rounds, args.warmup = 64, 2, 1, 1
    if min(args.width, args.layers, args.batch, args.steps, args.rounds) < 1 or args.warmup < 0:
        parser.error("--width, --layers, --batch, --steps and --rounds must be >= 1, --warmup >= 0")
    return args


class _Clock:
    """Wall time of each training batch: inside it (``ms``: Keras' callbacks around the step) and
    from the end of the batch before (``wall_ms``: what the loop takes per step, all included)."""

    def __init__(self, keras: Any) -> None:
        outer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
                outer.t0 = time.perf_counter()
                if outer.last_end is None:
                    outer.last_end = outer.t0

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                now = time.perf_counter()
                outer.ms.append((now - outer.t0) * 1e3)
                outer.wall_ms.append((now - (outer.last_end or outer.t0)) * 1e3)
                outer.last_end = now

        self.t0 = 0.0
        self.last_end: float | None = None
        self.ms: list[float] = []
        self.wall_ms: list[float] = []
        self.callback = Callback()


def _run(args: argparse.Namespace, which: str, store: pathlib.Path, keras: Any, np: Any) -> dict[str, Any]:
    import nearstep
    import nearstep.keras as nk

    keras.utils.set_random_seed(0)
    layers = [keras.Input((args.width,))]
    layers += [keras.layers.Dense(args.width, activation="gelu") for _ in range(args.layers - 1)]
    layers += [keras.layers.Dense(args.width)]
    model = keras.Sequential(layers)
    kwargs = dict(learning_rate=1e-4, weight_decay=0.01)
    if which == "keras":
        opt = keras.optimizers.AdamW(**kwargs)
    else:
        cores = sorted(os.sched_getaffinity(0))
        opt = nk.AdamW(**kwargs, store=store, device=nearstep.DeviceConfig(cores=(cores[-1],)),
                       mode="overlap" if which == "nearstep-overlap" else "sync")
    model.compile(optimizer=opt, loss="mse")
    rng = np.random.default_rng(1)
    n = args.batch * (args.warmup + args.steps)
    x = rng.normal(size=(n, args.width)).astype("float32")
    y = rng.normal(size=(n, args.width)).astype("float32")
    clock = _Clock(keras)
    history = model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False, callbacks=[clock.callback])
    timed = (clock.wall_ms if args.backend == "torch" else clock.ms)[args.warmup:]
    result = {"optimizer": which, "ms_per_step": statistics.median(timed), "step_ms": timed,
              "in_batch_ms": clock.ms[args.warmup:], "wall_ms": clock.wall_ms[args.warmup:],
              "loss": float(history.history["loss"][-1]),
              "params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
              "optimizer_variable_bytes": int(sum(np.prod(v.shape) * 4 for v in opt.variables))}
    if which != "keras":
        stats = opt.stats()
        result |= {"host_step_ms": stats["step_ms"], "store_bytes_per_step": stats["store_bytes_per_step"],
                   "overlap_fraction": stats["overlap_fraction"],
                   "device_busy_ms_per_step": 1e3 * opt.nearstep_optimizer.trace.summary()["device_busy_seconds"]
                   / max(stats["host_steps"], 1)}
        opt.close()
    return result


def _rounds(runs: list[dict[str, Any]]) -> str:
    return " ".join(f"{r['ms_per_step']:.0f}" for r in runs)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras
        import numpy as np
    except ImportError as exc:
        print(f"nearstep bench keras: needs keras and its backend ({exc}); install them with: "
              f"pip install keras {'tensorflow-cpu' if args.backend == 'tensorflow' else ''}".rstrip(), file=sys.stderr)
        return 2
    if keras.backend.backend() != args.backend:
        print(f"nearstep bench keras: keras was imported with the {keras.backend.backend()} backend already",
              file=sys.stderr)
        return 2
    names = ("keras", "nearstep", "nearstep-overlap") if args.backend == "torch" else ("keras", "nearstep")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with scratch(args.dir) as work:
        for r in range(args.rounds):
            for which in runs:  # A B A B: the VM drifts; side by side, both see it
                res = _run(args, which, work / f"store-{which}-{r}", keras, np)
                runs[which].append(res)
                print(f"nearstep bench keras: round {r + 1}/{args.rounds} {which}: {res['ms_per_step']:.1f} ms/step",
                      file=sys.stderr, flush=True)
    med = {k: statistics.median(r["ms_per_step"] for r in v) for k, v in runs.items()}
    first = runs["nearstep"][0]
    out = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(args.dir),
           "backend": args.backend, "keras": keras.__version__, "options": {k: str(v) for k, v in vars(args).items()},
           "ms_per_step": med, "nearstep_over_keras": med["nearstep"] / med["keras"],
           "host_step_ms": statistics.median(r["host_step_ms"] for r in runs["nearstep"]),
           "runs": runs}
    if args.backend == "torch":
        import torch

        out["torch"] = torch.__version__
        out["overlap_over_keras"] = med["nearstep-overlap"] / med["keras"]
        out["overlap_over_sync"] = med["nearstep-overlap"] / med["nearstep"]
        out["overlap_fraction"] = statistics.median(r["overlap_fraction"] for r in runs["nearstep-overlap"])
    timing = ("from one on_train_batch_end to the next" if args.backend == "torch"
              else "on_train_batch_begin to on_train_batch_end")
    lines = [f"nearstep bench keras --backend {args.backend}", f"machine: {out['machine']}, {out['date']}",
             f"model: {args.layers} Dense {args.width}x{args.width} (gelu), {first['params'] / 1e6:.1f} M params, batch "
             f"{args.batch}, fp32, AdamW lr 1e-4 wd 0.01; Keras {keras.__version__}"
             f"{', torch ' + out['torch'] if 'torch' in out else ''}; {args.steps} timed steps after "
             f"{args.warmup} warm-up, {args.rounds} round(s) alternating; a step timed {timing}; nearstep: "
             f"emulated device on the last core", "",
             table_line("keras.optimizers.AdamW ms/step", f"{med['keras']:.1f}",
                        f"rounds {_rounds(runs['keras'])}; moments in Keras "
                        f"variables: {runs['keras'][0]['optimizer_variable_bytes'] / 2**20:.0f} MiB"),
             table_line("nearstep.keras.AdamW ms/step", f"{med['nearstep']:.1f}",
                        f"sync; rounds {_rounds(runs['nearstep'])}; moments in the "
                        f"store, Keras holds {first['optimizer_variable_bytes'] / 2**20:.2f} MiB")]
    if args.backend == "torch":
        lines.append(table_line("nearstep.keras overlap ms/step", f"{med['nearstep-overlap']:.1f}",
                                f"mode='overlap'; rounds {_rounds(runs['nearstep-overlap'])}; device busy "
                                f"{out['overlap_fraction']:.0%} of its time while Keras worked"))
    lines += [table_line("nearstep / keras", f"{out['nearstep_over_keras']:.3f}", "what sync costs on this machine"),
              table_line("nearstep step() ms", f"{out['host_step_ms']:.1f}",
                         "sync: inside the device's update, per step (stats()['step_ms'])")]
    if args.backend == "torch":
        lines += [table_line("nearstep overlap / keras", f"{out['overlap_over_keras']:.3f}", "what overlap costs"),
                  table_line("nearstep overlap / sync", f"{out['overlap_over_sync']:.3f}", "what overlap saves")]
    print("\n".join(lines))
    args.json.write_text(json.dumps(out, indent=2))
    return 0
