"""FilteredDataset: the filter process streams exactly what the offline filter keeps."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from nearstep.data import CorpusChangedError, DataError, Filter, FilterConfig, FilteredDataset, Policy, StreamConfig, open_corpus


def _corpus(root: Path, docs: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]
    texts = []
    for i in range(docs):
        if texts and rng.random() < 0.2:
            base = rng.choice(texts).split()
            for _ in range(rng.randint(0, 3)):  # a near copy: a few words changed
                base[rng.randrange(len(base))] = rng.choice(vocab)
            body = " ".join(base)
        else:
            body = " ".join(rng.choice(vocab) for _ in range(rng.randint(30, 120)))
        texts.append(body)
    root.mkdir(parents=True, exist_ok=True)
    for i, body in enumerate(texts):
        footer = "\nSubscribe to our newsletter for more." if i % 7 == 0 else ""
        (root / f"{i:04d}.txt").write_text(body + footer)
    return root


def _offline(root: Path, state: Path, config: FilterConfig) -> list:
    return list(Filter(open_corpus(root), config, state).records())


@pytest.mark.parametrize("policy", [Policy.CAP, Policy.WEIGHT])
def test_stream_yields_exactly_what_the_offline_filter_keeps(tmp_path: Path, policy: Policy) -> None:
    root = _corpus(tmp_path / "data")
    config = FilterConfig(threshold=0.7, policy=policy, cap=1, boilerplate_min_docs=5)
    offline = _offline(root, tmp_path / "offline", config)
    data = FilteredDataset(root, config, state_dir=tmp_path / "stream", stream=StreamConfig(scan_batch=37, batch_records=5))
    streamed = list(data)
    assert [(k.index, k.text, k.weight) for k in streamed] == [(k.index, k.text, k.weight) for k in offline]
    assert len(offline) < 300  # the corpus has copies: something was removed
    assert all("Subscribe" not in k.text for k in streamed)  # the footer is boilerplate
    if policy is Policy.WEIGHT:
        assert any(k.weight < 1.0 for k in streamed)
    # A second epoch replays the saved scan and gives the same records.
    again = [k.index for k in data]
    assert again == [k.index for k in streamed]
    assert data.last_report is not None and data.last_report["records"] == 300


def test_stream_through_a_dataloader_and_resume_from_state_dict(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "data", docs=200, seed=1)
    config = FilterConfig(threshold=0.7)
    everything = [k.index for k in _offline(root, tmp_path / "offline", config)]
    data = FilteredDataset(root, config, state_dir=tmp_path / "s", transform=lambda k: k.index)
    got: list[int] = []
    for batch in DataLoader(data, batch_size=8, collate_fn=list):
        got.extend(batch)
        if len(got) >= 40:
            break  # the trainer stops mid-epoch: the filter process exits, its progress stays
    state = data.state_dict()
    assert state["consumed"] == len(got)
    resumed = FilteredDataset(root, config, state_dir=tmp_path / "s", transform=lambda k: k.index)
    resumed.load_state_dict(state)
    rest = [i for batch in DataLoader(resumed, batch_size=8, collate_fn=list) for i in batch]
    assert got + rest == everything


def test_stream_refuses_several_loader_workers(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "data", docs=20)
    data = FilteredDataset(root, FilterConfig(), state_dir=tmp_path / "s")
    with pytest.raises(DataError, match="num_workers=0"):
        list(DataLoader(data, batch_size=4, num_workers=2, collate_fn=list))


def test_a_corpus_changed_during_the_stream_is_a_loud_error(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "data", docs=120, seed=2)
    data = FilteredDataset(root, FilterConfig(), state_dir=tmp_path / "s", stream=StreamConfig(scan_batch=16, batch_records=1))
    it = iter(data)
    next(it)
    target = root / "0119.txt"  # not read yet: the scan is in its first batches
    target.write_text("changed " * 50)
    os.utime(target, ns=(1, 1))
    with pytest.raises(CorpusChangedError, match="changed during the scan"):
        for _ in it:
            pass


def test_stream_of_a_path_that_is_not_a_corpus_fails_before_any_process(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        FilteredDataset(tmp_path / "missing")
