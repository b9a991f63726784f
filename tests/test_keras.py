"""nearstep.keras: Keras 3 optimizers on the device, against Keras' own on the same model and data.

TensorFlow backend in this process (CI installs tensorflow-cpu and keras); the torch backend in a
subprocess, since Keras picks its backend once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("these tests run Keras on TensorFlow; this process's Keras has another backend",
                allow_module_level=True)

import numpy as np  # noqa: E402

import nearstep  # noqa: E402
import nearstep.keras as nk  # noqa: E402
from nearstep import tools  # noqa: E402
from nearstep.errors import StoreError, UnsupportedUsageError  # noqa: E402

STEPS_PER_EPOCH, EPOCHS = 4, 5  # 20 steps


def data(seed: int = 0, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    # Named layers: the same variable paths in every model of the process (Keras numbers unnamed ones).
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="hidden"),
                             keras.layers.LayerNormalization(name="norm"), keras.layers.Dense(1, name="head")])


def schedule() -> keras.optimizers.schedules.LearningRateSchedule:
    return keras.optimizers.schedules.ExponentialDecay(2e-2, decay_steps=5, decay_rate=0.6)


CASES = {
    "adamw": ("AdamW", dict(weight_decay=0.05, global_clipnorm=0.5)),
    "adam": ("Adam", dict(weight_decay=0.02, clipnorm=0.3, beta_1=0.8, epsilon=1e-6)),
    "adam-no-decay": ("Adam", dict(clipvalue=0.1)),
    "sgd-momentum": ("SGD", dict(momentum=0.9, weight_decay=0.01, global_clipnorm=1.0)),
    "sgd-nesterov": ("SGD", dict(momentum=0.8, nesterov=True, clipnorm=0.5)),
    "sgd-plain": ("SGD", dict(weight_decay=0.1)),
    "lion": ("Lion", dict(weight_decay=0.1, global_clipnorm=1.0)),
}


def pair(case: str, tmp_path, **extra):
    """The Keras optimizer and nearstep's, with the same arguments and weight-decay exclusions."""
    name, kwargs = CASES[case]
    kwargs = {"learning_rate": schedule() if name != "Lion" else 2e-3, **kwargs, **extra}
    ref = getattr(keras.optimizers, name)(**kwargs)
    mine = getattr(nk, name)(**kwargs, store=tmp_path / f"store-{case}", device="inline")
    for opt in (ref, mine):
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return ref, mine


def fit_both(ref_opt, my_opt, epochs: int = EPOCHS, batch: int = 16):
    x, y = data()
    ref, mine = model(), model()
    ref.compile(optimizer=ref_opt, loss="mse")
    mine.compile(optimizer=my_opt, loss="mse")
    h_ref = ref.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False)
    h_mine = mine.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False)
    return ref, mine, h_ref.history["loss"], h_mine.history["loss"]


def assert_same_weights(a, b, *, exact: bool = False) -> None:
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        if exact:
            np.testing.assert_array_equal(wa, wb)
        else:  # fp32 rounding over 20 steps: the two compute each step in another order
            np.testing.assert_allclose(wa, wb, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_fit_matches_the_keras_optimizer(case, tmp_path) -> None:
    ref_opt, my_opt = pair(case, tmp_path)
    ref, mine, loss_ref, loss_mine = fit_both(ref_opt, my_opt)
    assert my_opt.stats()["step"] == STEPS_PER_EPOCH * EPOCHS == int(ref_opt.iterations.numpy())
    assert_same_weights(ref, mine)
    np.testing.assert_allclose(loss_mine, loss_ref, rtol=5e-5)  # a sum over the batch of the weights' differences
    assert my_opt.variables == [my_opt._iterations] or len(my_opt.variables) < len(ref_opt.variables)
    assert not any("momentum" in v.path or "velocit" in v.path for v in my_opt.variables)  # moments: in the store
    my_opt.close()


@pytest.mark.parametrize("case", ["adamw", "sgd-momentum"])
def test_gradient_accumulation_matches_keras(case, tmp_path) -> None:
    ref_opt, my_opt = pair(case, tmp_path, gradient_accumulation_steps=2)
    ref, mine, _, _ = fit_both(ref_opt, my_opt, epochs=3, batch=8)  # 24 micro-batches, 12 updates
    assert my_opt.stats()["step"] == 12 == int(ref_opt.iterations.numpy())
    assert_same_weights(ref, mine)
    my_opt.close()


class _Lockstep(keras.callbacks.Callback):
    """Records the weights before and after each batch; with ``feed``, sets them before each batch."""

    def __init__(self, feed=None) -> None:
        super().__init__()
        self.feed, self.before, self.after = feed, [], []

    def on_train_batch_begin(self, batch, logs=None):
        if self.feed is not None:
            self.model.set_weights(self.feed[len(self.before)])
        self.before.append(self.model.get_weights())

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(self.model.get_weights())


@pytest.mark.parametrize("policy, loss_scale", [
    ("mixed_float16", None),  # compile wraps both optimizers in a LossScaleOptimizer
    ("mixed_bfloat16", None),
    ("mixed_float16", dict(initial_scale=2.0**12, dynamic_growth_steps=3)),  # wrapped by hand, overflowing often
], ids=["mixed_float16", "mixed_bfloat16", "loss-scale-optimizer"])
def test_mixed_precision_matches_keras_in_lockstep(policy, loss_scale, tmp_path) -> None:
    # A half-precision forward turns fp32 rounding in the weights into half-precision rounding in
    # the gradients, so freely run the two part by 1e-5 within a few steps without any error in
    # the update. In lockstep nearstep's run starts each batch from the weights Keras' run had
    # there (set_weights, adopted by the store): the same gradients, so the weights after each
    # batch agree within fp32 rounding, over the whole run, as in float32. Overlap mode (torch
    # backend): tests/test_keras_overlap.py.
    x, y = data()
    keras.mixed_precision.set_global_policy(policy)
    try:
        ref_opt, my_opt = pair("adamw", tmp_path)
        if loss_scale is not None:
            ref_opt, my_opt = (keras.optimizers.LossScaleOptimizer(o, **loss_scale) for o in (ref_opt, my_opt))
        ref, mine = model(), model()
        ref.compile(optimizer=ref_opt, loss="mse")
        mine.compile(optimizer=my_opt, loss="mse")
        recorded = _Lockstep()
        ref.fit(x, y, batch_size=16, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=[recorded])
        lockstep = _Lockstep(recorded.before)
        mine.fit(x, y, batch_size=16, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=[lockstep])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    wrapped = {type(m.optimizer).__name__ for m in (ref, mine)}
    assert wrapped == {"AdamW" if policy == "mixed_bfloat16" else "LossScaleOptimizer"}
    for after_ref, after_mine in zip(recorded.after, lockstep.after, strict=True):
        for a, b in zip(after_ref, after_mine, strict=True):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
    skipped = sum(all(np.array_equal(a, b) for a, b in zip(before, after))
                  for before, after in zip(recorded.before, recorded.after))
    assert skipped >= (0 if policy == "mixed_bfloat16" else 2)  # loss-scale overflows: no update
    inner = getattr(mine.optimizer, "inner_optimizer", mine.optimizer)
    assert int(mine.optimizer.iterations.numpy()) == int(ref.optimizer.iterations.numpy()) == \
        inner.stats()["step"] == STEPS_PER_EPOCH * EPOCHS - skipped
    if loss_scale is not None or policy == "mixed_float16":
        assert float(mine.optimizer.dynamic_scale.numpy()) == float(ref.optimizer.dynamic_scale.numpy())
    inner.close()


@pytest.mark.parametrize("policy", ["float16", "bfloat16"])
def test_half_precision_variables_are_refused_with_what_to_do(policy, tmp_path) -> None:
    # Not a mixed policy: the variables themselves are half precision, which Keras' optimizers
    # update in half-precision arithmetic (bf16 updates round away, fp16 moments overflow).
    keras.mixed_precision.set_global_policy(policy)
    try:
        m = model()
        opt = nk.AdamW(store=tmp_path / "run", device="inline")
        m.compile(optimizer=opt, loss="mse")
        x, y = data()
        with pytest.raises(UnsupportedUsageError, match=f"mixed_bfloat16.*float32 variables|{policy}") as caught:
            m.fit(x, y, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert policy in str(caught.value) and "set_global_policy('mixed_bfloat16')" in str(caught.value)
    opt.close()


def test_weights_set_between_fits_are_adopted(tmp_path) -> None:
    ref_opt, my_opt = pair("adamw", tmp_path)
    ref, mine, _, _ = fit_both(ref_opt, my_opt, epochs=1)
    for m in (ref, mine):
        m.set_weights([w * 0.5 for w in m.get_weights()])
    x, y = data(1)
    for m in (ref, mine):
        m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert_same_weights(ref, mine)
    my_opt.close()


def test_run_eagerly_matches_keras_run_eagerly(tmp_path) -> None:
    # Graph and eager TensorFlow compute the forward and backward with other kernels, so each is
    # compared with Keras' own optimizer run the same way.
    x, y = data()
    ref_opt, my_opt = pair("sgd-nesterov", tmp_path)
    ref, mine = model(), model()
    ref.compile(optimizer=ref_opt, loss="mse", run_eagerly=True)
    mine.compile(optimizer=my_opt, loss="mse", run_eagerly=True)
    for m in (ref, mine):
        m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert my_opt.stats()["step"] == 8
    assert_same_weights(ref, mine)
    my_opt.close()


def test_the_emulated_device_gives_the_same_numbers(tmp_path) -> None:
    kwargs = dict(learning_rate=schedule(), weight_decay=0.05, global_clipnorm=0.5)
    inline = nk.AdamW(**kwargs, store=tmp_path / "inline", device="inline")
    emulated = nk.AdamW(**kwargs, store=tmp_path / "emulated")  # the default device: a process of its own
    a, b, _, _ = fit_both(inline, emulated, epochs=2)
    assert emulated.stats()["backend"] == "emulated"
    assert_same_weights(a, b, exact=True)
    inline.close()
    emulated.close()


def test_model_save_and_load_model_resume_bit_for_bit(tmp_path) -> None:
    x, y = data()
    m = model()
    opt = nk.AdamW(learning_rate=schedule(), weight_decay=0.05, store=tmp_path / "run", device="inline")
    m.compile(optimizer=opt, loss="mse")
    m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    m.save(tmp_path / "m.keras")
    m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)  # the run that was not interrupted
    with pytest.warns(UserWarning, match="in use by another optimizer"):
        loaded = keras.saving.load_model(tmp_path / "m.keras")  # the first still holds its store
    assert isinstance(loaded.optimizer, nk.AdamW)
    assert int(loaded.optimizer.iterations.numpy()) == 8 and loaded.optimizer.stats()["step"] == 8
    loaded.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert_same_weights(m, loaded, exact=True)
    opt.close()
    loaded.optimizer.close()


def test_a_constrained_model_resumes_from_load_model_bit_for_bit(tmp_path) -> None:
    # A constraint changes the weights after the update, so the checkpoint's weights are not the
    # masters saved beside them; the run that saved them adopts them at its next update, and so
    # must the resumed one.
    def constrained() -> keras.Model:
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(
            16, activation="tanh", kernel_constraint=keras.constraints.NonNeg(), name="hidden"),
            keras.layers.Dense(1, name="head")])

    x, y = data()
    runs = []
    for name in ("straight", "saved"):
        m = constrained()
        m.compile(optimizer=nk.AdamW(learning_rate=schedule(), store=tmp_path / name, device="inline"), loss="mse")
        m.fit(x, y, batch_size=16, epochs=2 if name == "saved" else 4, verbose=0, shuffle=False)
        runs.append(m)
    straight, saved = runs
    saved.save(tmp_path / "m.keras")
    saved.optimizer.close()
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    loaded.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert_same_weights(straight, loaded, exact=True)
    straight.optimizer.close()
    loaded.optimizer.close()


def test_load_model_in_a_new_run_takes_the_store_back(tmp_path) -> None:
    x, y = data()
    m = model()
    opt = nk.SGD(learning_rate=0.05, momentum=0.9, store=tmp_path / "run", device="inline")
    m.compile(optimizer=opt, loss="mse")
    m.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    m.save(tmp_path / "m.keras")
    m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    opt.close()  # that run ends; its store is at step 12, the checkpoint at step 4
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.store_path == str((tmp_path / "run").resolve()) or \
        os.path.samefile(loaded.optimizer.store_path, tmp_path / "run")
    assert loaded.optimizer.stats()["step"] == 4  # the checkpoint's state replaced the store's
    loaded.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert_same_weights(m, loaded, exact=True)
    loaded.optimizer.close()


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch: int) -> None:
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_bit_for_bit(tmp_path) -> None:
    x, y = data()
    straight = model()
    straight_opt = nk.AdamW(learning_rate=schedule(), store=tmp_path / "straight", device="inline")
    straight.compile(optimizer=straight_opt, loss="mse")
    straight.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)

    m = model()
    opt = nk.AdamW(learning_rate=schedule(), store=tmp_path / "resumed", device="inline")
    m.compile(optimizer=opt, loss="mse")
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        m.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False, callbacks=[backup, _Interrupt(2)])
    m.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)  # progress that the restore must undo
    m.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False, callbacks=[backup])
    assert opt.stats()["step"] == 16
    assert_same_weights(straight, m, exact=True)
    straight_opt.close()
    opt.close()


def test_model_checkpoint_callback_writes_a_loadable_model(tmp_path) -> None:
    x, y = data()
    m = model()
    opt = nk.Lion(learning_rate=1e-3, store=tmp_path / "run", device="inline")
    m.compile(optimizer=opt, loss="mse")
    path = tmp_path / "ckpt.keras"
    m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
          callbacks=[keras.callbacks.ModelCheckpoint(str(path))])
    opt.close()
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, nk.Lion) and loaded.optimizer.stats()["step"] == 8
    assert_same_weights(m, loaded, exact=True)
    loaded.optimizer.close()


def test_the_store_tools_read_a_store_made_from_keras(tmp_path, capsys) -> None:
    x, y = data()
    m = model()
    opt = nk.AdamW(store=tmp_path / "run", device="inline")
    m.compile(optimizer=opt, loss="mse")
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    opt.close()
    store = str(tmp_path / "run")
    assert tools.main(["inspect", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    kernel_name = "/".join(m.layers[0].kernel.path.split("/")[-2:])  # e.g. dense_12/kernel
    assert kernel_name in json.dumps(info) and info["step"] == 4
    assert tools.main(["verify", store]) == 0
    capsys.readouterr()
    out = tmp_path / "exported.safetensors"
    assert tools.main(["export", store, str(out)]) == 0
    from safetensors.numpy import load_file

    exported = load_file(out)
    kernel = exported[kernel_name]
    np.testing.assert_array_equal(kernel, m.layers[0].kernel.numpy())


def test_a_store_from_an_earlier_run_is_refused(tmp_path) -> None:
    x, y = data()
    for attempt in range(2):
        m = model()
        opt = nk.AdamW(store=tmp_path / "run", device="inline")
        m.compile(optimizer=opt, loss="mse")
        if attempt == 0:
            m.fit(x, y, batch_size=16, epochs=1, verbose=0)
            opt.close()
        else:
            before = m.get_weights()
            with pytest.raises(StoreError, match="earlier run"):
                m.fit(x, y, batch_size=16, epochs=1, verbose=0)
            for a, b in zip(before, m.get_weights()):
                np.testing.assert_array_equal(a, b)  # the refused store put nothing into the model


def test_changing_which_variables_decay_after_the_first_update_is_refused(tmp_path) -> None:
    x, y = data()
    m = model()
    opt = nk.AdamW(weight_decay=0.1, store=tmp_path / "run", device="inline")
    m.compile(optimizer=opt, loss="mse", run_eagerly=True)
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    opt.exclude_from_weight_decay(var_names=["bias"])
    with pytest.raises(UnsupportedUsageError, match="exclude_from_weight_decay"):
        m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    opt.close()


def test_jit_compile_is_refused_with_what_to_do(tmp_path) -> None:
    m = model()
    m.compile(optimizer=nk.AdamW(store=tmp_path / "run", device="inline"), loss="mse", jit_compile=True)
    x, y = data()
    with pytest.raises(UnsupportedUsageError, match="jit_compile=False"):
        m.fit(x, y, epochs=1, verbose=0)


class _Unused(keras.layers.Layer):
    def build(self, shape):
        self.used = self.add_weight(shape=(shape[-1],), initializer="ones")
        self.spare = self.add_weight(shape=(3,), initializer="zeros")  # never in the loss

    def call(self, x):
        return x * self.used


def test_a_variable_without_gradient_is_refused(tmp_path) -> None:
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8,)), _Unused(), keras.layers.Dense(1)])
    m.compile(optimizer=nk.AdamW(store=tmp_path / "run", device="inline"), loss="mse")
    x, y = data()
    with pytest.raises(UnsupportedUsageError, match="trainable=False"):
        m.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("make, match", [
    (lambda: nk.AdamW(use_ema=True), "use_ema"),
    (lambda: nk.Adam(amsgrad=True), "amsgrad"),
    (lambda: nk.Adam(beta_1=lambda: 0.9), "beta_1 as a number"),
    (lambda: nk.SGD(nesterov=True), "needs a momentum"),
    (lambda: nk.AdamW(weight_decay=None), "weight_decay"),
    (lambda: nk.SGD(mode="delayed"), "'sync' or 'overlap'.*one step stale"),
])
def test_bad_arguments_are_refused(make, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_overlap_is_refused_on_tensorflow_with_why_and_what_to_do() -> None:
    # Overlap on Keras' torch backend: tests/test_keras_overlap.py.
    with pytest.raises(ValueError, match="torch backend") as caught:
        nk.AdamW(mode="overlap")
    assert "compiled graph" in str(caught.value) and "mode='sync'" in str(caught.value)


def test_config_round_trips_and_nearstep_is_importable_without_keras() -> None:
    opt = nk.SGD(learning_rate=0.1, momentum=0.5, nesterov=True, store="/tmp/x",
                 device=nearstep.DeviceConfig(backend="inline"), state_format="bf16-sr+8bit")
    again = nk.SGD.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()
    code = "import sys, nearstep; assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


TORCH_BACKEND = textwrap.dedent("""
    import os, sys
    os.environ["KERAS_BACKEND"] = "torch"
    import numpy as np, keras
    import nearstep.keras as nk
    assert keras.backend.backend() == "torch"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32"); y = rng.normal(size=(64, 1)).astype("float32")
    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                                 keras.layers.LayerNormalization(), keras.layers.Dense(1)])
    sched = lambda: keras.optimizers.schedules.ExponentialDecay(2e-2, decay_steps=5, decay_rate=0.6)
    worst = {}
    for name, kw in (("AdamW", dict(weight_decay=0.05, global_clipnorm=0.5)),
                     ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
                     ("Lion", dict(weight_decay=0.1))):
        lr = 2e-3 if name == "Lion" else sched()
        ref_opt = getattr(keras.optimizers, name)(learning_rate=lr, **kw)
        my_opt = getattr(nk, name)(learning_rate=lr if name == "Lion" else sched(), **kw,
                                   store=os.path.join(sys.argv[1], name), device="inline")
        for o in (ref_opt, my_opt):
            o.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
        ref, mine = model(), model()
        ref.compile(optimizer=ref_opt, loss="mse"); mine.compile(optimizer=my_opt, loss="mse")
        ref.fit(x, y, batch_size=16, epochs=5, verbose=0, shuffle=False)
        mine.fit(x, y, batch_size=16, epochs=5, verbose=0, shuffle=False)
        assert my_opt.stats()["step"] == 20
        for a, b in zip(ref.get_weights(), mine.get_weights()):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
        my_opt.close()
    print("ok")
""")


def test_the_torch_backend_matches_keras_too(tmp_path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    run = subprocess.run([sys.executable, "-c", TORCH_BACKEND, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_bench_keras_prints_a_table_and_writes_json(tmp_path, capsys) -> None:
    from nearstep.bench import keras as bench_keras

    out = tmp_path / "keras.json"
    assert bench_keras.main(["--quick", "--dir", str(tmp_path / "b"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == "tensorflow" and set(res["ms_per_step"]) == {"keras", "nearstep"}
    assert all(v > 0 for v in res["ms_per_step"].values()) and res["nearstep_over_keras"] > 0
    (mine,), (theirs,) = res["runs"]["nearstep"], res["runs"]["keras"]
    assert mine["params"] == theirs["params"] and mine["optimizer_variable_bytes"] < theirs["optimizer_variable_bytes"]
    assert mine["store_bytes_per_step"] >= 24 * mine["params"]  # AdamW fp32: 12 bytes read, 12 written
    printed = capsys.readouterr().out
    assert "nearstep / keras" in printed and "keras.optimizers.AdamW" in printed
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())  # the stores are gone
