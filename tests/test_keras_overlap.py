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
    import json, os, sys, time, traceback
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

    def optimizer(name, mode, device="inline", exclude=("gamma", "beta", "bias"), **extra):
        """nearstep's optimizer, or Keras' own (mode="keras") with the same arguments and exclusions."""
        kwargs = dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(2e-2, 5, 0.6),
                      **{**CASES[name], **extra})
        opt = getattr(keras.optimizers, name)(**kwargs) if mode == "keras" else getattr(nk, name)(
            **kwargs, mode=mode, device=device, slice_mb=SLICE_MB,
            store=os.path.join(WORK, f"{name}-{mode}-{next(stores)}"))
        opt.exclude_from_weight_decay(var_names=list(exclude))
        return opt

    class Reads(keras.callbacks.Callback):
        """What a callback sees in the middle of training: Keras' reads and torch's state_dict.

        With ``feed`` (a list of weights per batch) it sets the model's weights before each batch:
        a run in lockstep with the run that recorded them (see the mixed-precision cases).
        """

        def __init__(self, feed=None):
            super().__init__()
            self.weights, self.state, self.predictions, self.before, self.feed = [], [], [], [], feed

        def on_train_batch_begin(self, batch, logs=None):
            if self.feed is not None:
                self.model.set_weights(self.feed[len(self.before)])
            self.before.append(self.model.get_weights())

        def on_train_batch_end(self, batch, logs=None):
            self.weights.append(self.model.get_weights())
            self.state.append([t.detach().numpy().copy() for t in self.model.state_dict().values()])

        def on_epoch_end(self, epoch, logs=None):
            self.predictions.append(self.model.predict(x[:8], verbose=0))

    def same(a, b):
        return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))

    def close_to_keras(a, b):
        # The tolerance of sync against Keras' own optimizers in tests/test_keras.py: fp32 rounding.
        assert len(a) == len(b)
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6)

    def fit(name, mode, torch_module=False, epochs=3, batch_size=16, feed=None, loss_scale=None, **extra):
        m, opt, reads = model(torch_module), optimizer(name, mode, **extra), Reads(feed)
        m.compile(optimizer=opt if loss_scale is None else keras.optimizers.LossScaleOptimizer(opt, **loss_scale),
                  loss="mse")
        history = m.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False, callbacks=[reads])
        outer = m.optimizer  # a LossScaleOptimizer around opt when Keras or the caller wrapped it
        out = dict(weights=m.get_weights(), reads=reads, loss=history.history["loss"],
                   iterations=int(outer.iterations.numpy()), lr=float(opt.learning_rate),
                   micro_steps=int(opt._iterations.numpy()), wrapped=type(outer).__name__,
                   scale=float(outer.dynamic_scale.numpy()) if hasattr(outer, "dynamic_scale") else None,
                   step=opt.stats()["step"] if mode != "keras" else None)
        if mode != "keras":
            opt.close()
        return out

    def case(name):
        def run(fn):
            start = time.perf_counter()
            try:
                results[name] = {"ok": True, **(fn() or {})}
            except Exception:
                results[name] = {"ok": False, "detail": traceback.format_exc()[-3000:]}
            results[name]["seconds"] = round(time.perf_counter() - start, 2)
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

    @case("gradient-accumulation")
    def _():
        # Keras accumulates the micro-batches' gradients in its own variables and calls the update at
        # every Nth with their average (clipped after averaging); iterations counts updates, and the
        # schedule and the bias correction follow it. The overlapped update of an Nth micro-batch
        # lands during the next micro-batches, which only read the weights.
        runs = {mode: fit("AdamW", mode, batch_size=8, gradient_accumulation_steps=3, clipnorm=0.3,
                          global_clipnorm=None) for mode in ("keras", "sync", "overlap")}
        ref, sync, over = runs["keras"], runs["sync"], runs["overlap"]
        assert same(sync["weights"], over["weights"]), "final weights differ"
        assert same(sum(sync["reads"].weights, []), sum(over["reads"].weights, [])), "get_weights() differ"
        assert same(sum(sync["reads"].state, []), sum(over["reads"].state, [])), "state_dict() differs"
        assert sync["loss"] == over["loss"], (sync["loss"], over["loss"])
        counts = [(r["iterations"], r["micro_steps"]) for r in runs.values()]
        assert counts == [(8, 24)] * 3 and sync["step"] == over["step"] == 8, (counts, sync["step"], over["step"])
        assert sync["lr"] == over["lr"] == ref["lr"]
        close_to_keras(sync["weights"], ref["weights"])
        # Between updates the weights stay as they are (only the accumulators change).
        assert same(sync["reads"].weights[0], sync["reads"].weights[1])
        assert not same(sync["reads"].weights[1], sync["reads"].weights[2])

    # [Mixed precision] A policy's half-precision forward turns differences of fp32 rounding in the
    # weights (1e-7) into differences of half-precision rounding in the gradients wherever a weight
    # crosses a rounding boundary of its cast: run freely, Keras' AdamW and nearstep's part by 1e-5
    # after a few steps without any error in the update, and a step-count or scaling error would
    # hide in that noise. So Keras' optimizer and nearstep's are compared in lockstep: nearstep's
    # run starts each batch from the weights Keras' run had there (set_weights, adopted by the
    # store), so both see the same gradients and their moments only differ by fp32 rounding, and
    # the weights after each batch must agree within fp32 rounding over the whole run. Overlap
    # is compared with sync freely, bit for bit.
    PRECISION = {
        "mixed_float16": ("mixed_float16", None),  # compile wraps the optimizer in a LossScaleOptimizer
        "mixed_bfloat16": ("mixed_bfloat16", None),  # no loss scaling
        # Wrapped by hand, growing every 3 steps: the scale overflows again and again, the skipped
        # steps fall between updates of the moments.
        "loss-scale-optimizer": ("mixed_float16", dict(initial_scale=2.0**12, dynamic_growth_steps=3)),
    }
    for label, (policy, loss_scale) in PRECISION.items():
        @case(f"precision-{label}")
        def _(policy=policy, loss_scale=loss_scale):
            keras.mixed_precision.set_global_policy(policy)
            try:
                ref = fit("AdamW", "keras", loss_scale=loss_scale)
                lockstep = fit("AdamW", "sync", loss_scale=loss_scale, feed=ref["reads"].before)
                sync, over = fit("AdamW", "sync", loss_scale=loss_scale), fit("AdamW", "overlap", loss_scale=loss_scale)
            finally:
                keras.mixed_precision.set_global_policy("float32")
            assert {r["wrapped"] for r in (ref, lockstep, sync, over)} == \
                {"AdamW" if policy == "mixed_bfloat16" else "LossScaleOptimizer"}
            for after_ref, after_mine in zip(ref["reads"].weights, lockstep["reads"].weights, strict=True):
                close_to_keras(after_mine, after_ref)
            skipped = sum(same(b, a) for b, a in zip(ref["reads"].before, ref["reads"].weights))
            assert (lockstep["iterations"], lockstep["scale"]) == (ref["iterations"], ref["scale"])
            assert lockstep["step"] == ref["iterations"] == 12 - skipped
            assert skipped >= (0 if policy == "mixed_bfloat16" else 2), skipped
            assert same(sync["weights"], over["weights"]), "final weights differ"
            assert same(sum(sync["reads"].weights, []), sum(over["reads"].weights, [])), "get_weights() differ"
            assert same(sync["reads"].predictions, over["reads"].predictions), "predict() differs"
            assert (sync["loss"], sync["iterations"], sync["scale"], sync["step"]) == \
                (over["loss"], over["iterations"], over["scale"], over["step"])
            return {"skipped": skipped}

    @case("precision-save-load-continue")
    def _():
        # mixed_float16 in overlap mode: the nearstep state is saved by the inner optimizer of
        # Keras' LossScaleOptimizer, the dynamic scale by the wrapper; the resumed run is the straight one.
        # No decay exclusions: Keras does not save them (its own optimizers lose them in load_model too).
        keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            straight = fit("AdamW", "overlap", epochs=4, exclude=())
            m, opt = model(), optimizer("AdamW", "overlap", exclude=())
            m.compile(optimizer=opt, loss="mse")
            m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
            path = os.path.join(WORK, "mixed-overlap.keras")
            m.save(path)
            opt.close()
            again = keras.saving.load_model(path)
            assert type(again.optimizer).__name__ == "LossScaleOptimizer", again.optimizer
            again.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
            resumed = (again.get_weights(), int(again.optimizer.iterations.numpy()),
                       float(again.optimizer.dynamic_scale.numpy()))
            again.optimizer.inner_optimizer.close()
        finally:
            keras.mixed_precision.set_global_policy("float32")
        assert resumed[1:] == (straight["iterations"], straight["scale"]), (resumed[1:], straight["iterations"])
        assert same(resumed[0], straight["weights"])

    @case("half-precision-variables-refused")
    def _():
        # A "bfloat16" policy (not a mixed one) stores the variables in bf16: refused at the first step.
        keras.mixed_precision.set_global_policy("bfloat16")
        try:
            m, opt = model(), optimizer("AdamW", "overlap")
            m.compile(optimizer=opt, loss="mse")
            m.fit(x, y, batch_size=16, epochs=1, verbose=0)
        except UnsupportedUsageError as exc:
            assert "mixed_bfloat16" in str(exc) and "float32" in str(exc), str(exc)
        else:
            raise AssertionError("bfloat16 variables were accepted")
        finally:
            keras.mixed_precision.set_global_policy("float32")
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


def test_gradient_accumulation_overlap_equals_sync_and_sync_matches_keras(torch_backend) -> None:
    # gradient_accumulation_steps=3 with a schedule and clipnorm: overlap == sync bit for bit
    # (weights after fit and at every batch end, state_dict, losses, iterations), sync == Keras'
    # AdamW(gradient_accumulation_steps=3) within fp32 rounding.
    _check(torch_backend, "gradient-accumulation")


@pytest.mark.parametrize("case", ["mixed_float16", "mixed_bfloat16", "loss-scale-optimizer"])
def test_mixed_precision_matches_keras_and_overlap_equals_sync(torch_backend, case) -> None:
    # Sync against Keras' AdamW under the same policy (and LossScaleOptimizer), in lockstep (see
    # [Mixed precision] in SCRIPT); overlap against sync, bit for bit.
    _check(torch_backend, f"precision-{case}")


def test_mixed_precision_checkpoint_resumes_bit_for_bit_in_overlap(torch_backend) -> None:
    _check(torch_backend, "precision-save-load-continue")


def test_half_precision_variables_are_refused_with_what_to_do(torch_backend) -> None:
    _check(torch_backend, "half-precision-variables-refused")


def test_jit_compile_is_refused_in_overlap_mode(torch_backend) -> None:
    _check(torch_backend, "jit-compile-refused")
