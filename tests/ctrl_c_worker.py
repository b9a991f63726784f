"""A training loop under a storm of Ctrl-C (SIGINT at random moments), for test_step_failures.py.

``python ctrl_c_worker.py MODE SEED STORE_DIR``: trains TinyNet STEPS steps once without
interrupts (the reference) and once while a thread sends this process SIGINT every 2-30 ms.
The loop does what nearstep's notes ask of a loop that catches KeyboardInterrupt: it checks
that model, optimizer and store agree, and continues from the batch after the committed step.

An interrupt is raised only inside the loop's ``try`` bodies (training and the checks): Python
delivers a signal at any bytecode, and one landing on the loop's own bookkeeping between two
``try`` statements (the ``while`` test, the jump back) would escape any loop, not show a fault of
nearstep's. The handler disarms itself as it raises, so the ``except`` clause is never hit twice.
Prints one JSON line: interrupts caught, disagreements found, whether the final weights equal
the reference bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import nearstep
from nearstep.store import read_manifest
from nearstep.tools import read_masters
from conftest import batches, loss_of, make_model

STEPS = 24


def run(path: Path, mode: str, seed: int | None, reference: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], int, list[str]]:
    model = make_model()
    data = batches(STEPS)
    opt = nearstep.AdamW(model.named_parameters(), lr=1e-2, store=path, mode=mode, slice_mb=0.004, model=model)
    stop = threading.Event()

    def pester(rng: random.Random) -> None:
        while not stop.is_set():
            time.sleep(rng.uniform(0.002, 0.03))
            if not stop.is_set():
                os.kill(os.getpid(), signal.SIGINT)

    armed = [False]

    def interrupt(signum: int, frame: object) -> None:
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt
        # else: the loop is between two try statements; this interrupt is dropped (the storm goes on)

    previous = signal.signal(signal.SIGINT, interrupt)
    pesterer = threading.Thread(target=pester, args=(random.Random(seed),), daemon=True)
    if seed is not None:
        pesterer.start()
    caught, problems, i = 0, [], 0
    while i < STEPS:
        try:
            armed[0] = True
            loss_of(model, data[i]).backward()
            opt.step()
            opt.zero_grad()
            i += 1
            if seed is None:
                opt.synchronize()
                reference.append([p.detach().clone() for p in model.parameters()])
            armed[0] = False
        except KeyboardInterrupt as exc:
            caught += 1
            while True:  # the checks themselves may be interrupted: redo them
                try:
                    armed[0] = True
                    opt.synchronize()
                    weights = [p.detach().clone() for p in model.parameters()]
                    _, masters = read_masters(path)
                    step = opt.stats()["step"]
                    if step != read_manifest(path).step or not all(
                            torch.equal(w, m.view(w.shape)) for w, m in zip(weights, masters)):
                        problems.append("model, optimizer and store disagree: " + "".join(traceback.format_exception(exc)[-3:]))
                    if mode != "delayed" and step and not all(torch.equal(a, b) for a, b in zip(weights, reference[step - 1])):
                        problems.append(f"diverged at step {step}: " + "".join(traceback.format_exception(exc)[-3:]))
                    opt.zero_grad()
                    i = step
                    armed[0] = False
                    break
                except KeyboardInterrupt:
                    continue
    stop.set()
    if seed is not None:
        pesterer.join()  # its last SIGINT (sent as stop was set) lands under the handler above
    while True:
        try:
            armed[0] = True
            opt.close()
            armed[0] = False
            break
        except KeyboardInterrupt:
            continue
    signal.signal(signal.SIGINT, previous)
    return [p.detach().clone() for p in model.parameters()], caught, problems


def main() -> None:
    mode, seed, where = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    reference: list[list[torch.Tensor]] = []
    first, _, _ = run(where / "reference", mode, None, reference)
    final, caught, problems = run(where / "interrupted", mode, seed, reference)
    print(json.dumps({"caught": caught, "problems": problems[:3],
                      "final_equal": all(torch.equal(a, b) for a, b in zip(first, final))}))


if __name__ == "__main__":
    main()
