"""nearstep.keras in overlap mode (Keras' torch backend): the same numbers as sync, bit for bit.

Keras picks its backend once per process, so the torch-backend runs happen in one subprocess
(``SCRIPT``) that runs every case and reports them as JSON; each test below checks one case.
The refusal on TensorFlow is checked in tests/test_keras.py, which runs on that backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("keras")
pytest.importorskip("torch")

SCRIPT = textwrap.dedent('''
    import json, os, sys, traceback
    os.environ["KERAS_BACKEND"] = "torch"
    os.environ["NEARSTEP_CHECK_READS"] = "1"  # a torch read of weights still in flight raises
    import numpy as np, keras, torch
    import nearstep.keras as nk
    from nearstep.errors import StaleWeightError, UnsupportedUsageError
    assert keras.backend.backend() == "torch"
    WORK = sys.argv[1]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(64, 1))).astype("float32")
    results, stores = {}, iter(range(10**6))

    def model(torch_module=False):
        keras.utils.set_random_seed(0)
        first = (keras.layers.TorchModuleWrapper(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh()),
                                                 name="wrapped") if torch_module else
                 keras.layers.Dense(16, activation="tanh", kernel_constraint=keras.constraints.NonNeg(),
                                    name="hidden"))
        return keras.Sequential([keras.Input((8,)), first, keras.layers.LayerNormalization(name="norm"),
                                 keras.layers.Dense(1, name="head")])

    SLICE_MB = 2**-14  # 64 bytes: the variables in several slices each, landing one by one
    CASES = {"AdamW": dict(weight_decay=0.05, global_clipnorm=0.5),
             "SGD": dict(momentum=0.9, nesterov=True, weight_decay=0.01, clipnorm=0.3)}

    def optimizer(name, mode, device="inline"):
        opt = getattr(nk, name)(learning_rate=keras.optimizers.schedules.ExponentialDecay(2e-2, 5, 0.6),
                                **CASES[name], mode=mode, device=device, slice_mb=SLICE_MB,
                                store=os.path.join(WORK, f"{name}-{mode}-{next(stores)}"))
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
        return opt

    class Reads(keras.callbacks.Callback):
        """What a callback sees in the middle of training: Keras' reads and torch's state_dict."""

        def __init__(self):
            super().__init__()
            self.weights, self.state, self.predictions = [], [], []

        def on_train_batch_end(self, batch, logs=None):
            self.weights.append(self.model.get_weights())
            self.state.append([t.detach().numpy().copy() for t in self.model.state_dict().values()])

        def on_epoch_end(self, epoch, logs=None):
            self.predictions.append(self.model.predict(x[:8], verbose=0))

    def same(a, b):
        return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))

    def fit(name, mode, torch_module=False, epochs=3):
        m, opt, reads = model(torch_module), optimizer(name, mode), Reads()
        m.compile(optimizer=opt, loss="mse")
        history = m.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False, callbacks=[reads])
        out = dict(weights=m.get_weights(), reads=reads, loss=history.history["loss"],
                   iterations=int(opt.iterations.numpy()), lr=float(opt.learning_rate), step=opt.stats()["step"])
        opt.close()
        return out

    def case(name):
        def run(fn):
            try:
                results[name] = {"ok": True, **(fn() or {})}
            except Exception:
                results[name] = {"ok": False, "detail": traceback.format_exc()[-3000:]}
        return run

    SYNC = {}

    for name in CASES:
        @case(f"fit-{name}")
        def _():
            sync, over = fit(name, "sync"), fit(name, "overlap")
            SYNC[name] = sync
            assert same(sync["weights"], over["weights"]), "final weights differ"
            assert same(sum(sync["reads"].weights, []), sum(over["reads"].weights, [])), "get_weights() differ"
            assert same(sum(sync["reads"].state, []), sum(over["reads"].state, [])), "state_dict() differs"
            assert same(sync["reads"].predictions, over["reads"].predictions), "predict() differs"
            assert sync["loss"] == over["loss"], (sync["loss"], over["loss"])
            assert (sync["iterations"], sync["lr"], sync["step"]) == (over["iterations"], over["lr"], over["step"]) \\
                == (12, sync["lr"], 12)
            assert (sync["weights"][0] >= 0).all()  # the constraint held
            return {"max_weight": float(max(abs(w).max() for w in over["weights"]))}

    @case("torch-module")
    def _():
        sync, over = fit("AdamW", "sync", torch_module=True), fit("AdamW", "overlap", torch_module=True)
        assert same(sync["weights"], over["weights"]) and same(sum(sync["reads"].weights, []),
                                                               sum(over["reads"].weights, []))

    @case("save-load-continue")
    def _():
        finals = {}
        for mode in ("sync", "overlap"):
            m, opt = model(), optimizer("AdamW", mode)
            m.compile(optimizer=opt, loss="mse")
            path = os.path.join(WORK, f"ckpt-{mode}.keras")
            m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
                  callbacks=[keras.callbacks.ModelCheckpoint(path)])
            opt.close()
            again = keras.saving.load_model(path)
            assert again.optimizer.mode == mode
            again.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
            finals[mode] = (again.get_weights(), int(again.optimizer.iterations.numpy()))
            again.optimizer.close()
        assert finals["sync"][1] == finals["overlap"][1] == 16
        assert same(finals["sync"][0], finals["overlap"][0])

    @case("overlapped")
    def _():
        # The emulated device (its own process): the update runs while Keras goes on. A torch
        # read that bypasses the variables (what the guard is for) sees the previous step's
        # weights at the end of a batch; Keras' own read of the same variable sees the new ones.
        os.environ["NEARSTEP_CHECK_READS"] = "0"
        m, opt = model(), optimizer("AdamW", "overlap", device="emulated")
        head = m.get_layer("head").kernel
        seen = []

        class Peek(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                raw = head._value.detach().numpy().copy()  # torch's tensor, not Keras' value
                seen.append(not np.array_equal(raw, head.numpy()))

        m.compile(optimizer=opt, loss="mse")
        m.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False, callbacks=[Peek()])
        stats = opt.stats()
        opt.close()
        os.environ["NEARSTEP_CHECK_READS"] = "1"
        assert same(m.get_weights(), SYNC["AdamW"]["weights"]), "emulated overlap differs from sync"
        assert all(seen), seen
        assert stats["mode"] == "overlap" and stats["overlap_fraction"] > 0, stats
        return {"overlap_fraction": stats["overlap_fraction"]}

    @case("raw-read-caught")
    def _():
        # The reads no guard sees (torch's own, of the tensor behind a variable) are the user's to
        # order; NEARSTEP_CHECK_READS=1 makes one raise instead of reading the previous weights.
        m, opt = model(), optimizer("SGD", "overlap")
        head = m.get_layer("head").kernel

        class RawRead(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                (head._value * 1.0).sum()

        m.compile(optimizer=opt, loss="mse")
        try:
            m.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0, callbacks=[RawRead()])
        except StaleWeightError as exc:
            assert "synchronize()" in str(exc), str(exc)
        else:
            raise AssertionError("a torch read of a weight in flight was not caught")
        finally:
            opt.close()

    @case("jit-compile-refused")
    def _():
        m, opt = model(), optimizer("AdamW", "overlap")
        m.compile(optimizer=opt, loss="mse", jit_compile=True)
        try:
            m.fit(x, y, batch_size=16, epochs=1, verbose=0)
        except Exception as exc:
            assert "jit_compile=False" in str(exc) and isinstance(exc, UnsupportedUsageError), repr(exc)
        else:
            raise AssertionError("jit_compile=True was accepted in overlap mode")
        finally:
            opt.close()

    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def torch_backend(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("keras-overlap")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(work)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _check(results: dict, name: str) -> dict:
    result = results[name]
    assert result["ok"], result.get("detail")
    return result


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_overlap_fit_equals_sync_bit_for_bit(torch_backend, optimizer) -> None:
    # A schedule, clipping, decay with exclusions and a NonNeg constraint; what a callback reads
    # mid-training (get_weights, torch's state_dict, predict) too; with NEARSTEP_CHECK_READS=1.
    _check(torch_backend, f"fit-{optimizer}")


def test_overlap_lands_torch_modules_inside_the_model(torch_backend) -> None:
    _check(torch_backend, "torch-module")


def test_overlap_save_load_and_continue_equals_sync(torch_backend) -> None:
    _check(torch_backend, "save-load-continue")


def test_the_device_update_overlaps_keras_work(torch_backend) -> None:
    assert _check(torch_backend, "overlapped")["overlap_fraction"] > 0


def test_a_torch_read_of_weights_in_flight_is_caught_by_check_reads(torch_backend) -> None:
    _check(torch_backend, "raw-read-caught")


def test_jit_compile_is_refused_in_overlap_mode(torch_backend) -> None:
    _check(torch_backend, "jit-compile-refused")
