"""``nearstep data scan|dedup`` (nearstep.data.tools) on small corpora built in tmp_path."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nearstep.cli import main as cli_main
from nearstep.data.tools import WEIGHTS_FILE, main

FOOTER = "Subscribe to the Example Weekly newsletter for more stories like this one"
SYLLABLES = ["ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "de", "vu", "zo", "xi", "be", "fa", "gu", "hy"]


def _text(seed: int, n: int = 150) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(n)]
    return "\n".join(" ".join(words[i : i + 15]).capitalize() + "." for i in range(0, n, 15))


def _near(text: str) -> str:
    """The same document with its last word changed: Jaccard of 5-gram sets about 0.97."""
    head, _, _ = text.rpartition(" ")
    return head + " changedword."


def _folder(root: Path) -> Path:
    """17 files: 12 distinct documents (6 with the footer), 2 exact copies of a/00, 1 near copy of a/01,
    one made of a repeated line, one empty."""
    data = root / "corpus"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    base = [_text(i) for i in range(12)]
    for i, t in enumerate(base):
        if 2 <= i < 8:
            t = t + "\n" + FOOTER
        (data / "a" / f"{i:02d}.txt").write_text(t)
    (data / "b" / "copy1.txt").write_text(base[0].upper())  # same words, other case: an exact copy
    (data / "b" / "copy2.txt").write_text(base[0].replace(".", " ;"))  # and other punctuation
    (data / "b" / "near.txt").write_text(_near(base[1]))
    (data / "b" / "spam.txt").write_text("buy the pills now at the shop\n" * 30)
    (data / "b" / "empty.txt").write_text("  ... \n")
    return data


def _jsonl(path: Path) -> Path:
    """7 lines: 4 distinct records, one exact copy of record 0, a near copy of record 1, a bad line."""
    texts = [_text(100 + i) for i in range(4)]
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]
    lines.append(json.dumps({"id": 4, "text": texts[0]}))
    lines.append("{not json")
    lines.append(json.dumps({"id": 6, "text": _near(texts[1]), "lang": "xx"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _scan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    rc, out, err = _run(capsys, "scan", *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_scan_json_counts_what_was_built(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path)
    r = _scan_json(capsys, str(data), "--state", str(tmp_path / "st"))
    assert r["records"] == 17
    v = r["verdicts"]
    assert (v["kept"], v["exact"], v["near"], v["repetition"], v["empty"]) == (12, 2, 1, 1, 1)
    assert r["kept"] == 12
    assert r["clusters"] == 2 and r["clustered_docs"] == 5 and r["cluster_sizes"] == {"2": 1, "3": 1}
    assert r["repetition_rules"] and sum(r["repetition_rules"].values()) == 1
    assert r["boilerplate_lines"] == 6 and r["boilerplate_words"] == 6 * len(FOOTER.split())
    assert any(s["line"] == FOOTER and s["documents"] == 6 for s in r["boilerplate_samples"])
    assert [s["where"] for s in r["skips"]] == ["b/empty.txt"]
    assert r["bands"] * r["rows"] <= 128 and 0 < r["false_negative_area"] < 1
    assert r["memory"]["signature_bytes_per_doc"] == 512
    # The examples: the largest cluster first, members named and read back.
    big = r["examples"][0]
    assert big["size"] == 3
    assert [m["where"] for m in big["members"]] == ["a/00.txt", "b/copy1.txt", "b/copy2.txt"]
    assert [m["verdict"] for m in big["members"]] == ["kept", "exact", "exact"]
    assert big["members"][1]["text"].startswith(_text(0).upper()[:20]) and len(big["members"][0]["text"]) <= 80
    assert r["resumed_from"] == 0


def test_scan_text_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path)
    rc, out, _ = _run(capsys, "scan", str(data), "--state", str(tmp_path / "st"))
    assert rc == 0
    for needle in ("records     17", "kept        12", "exact 2", "near 1", "b/empty.txt", "a cluster of 3",
                   "b/copy1.txt", FOOTER[:40], "bands x", "memory per document", "fresh scan"):
        assert needle in out, needle
    rc, out, _ = _run(capsys, "scan", str(data), "--state", str(tmp_path / "st"))
    assert rc == 0 and "reused: all 17 records" in out


def test_second_scan_reuses_the_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path)
    state = tmp_path / "st"
    first = _scan_json(capsys, str(data), "--state", str(state))
    files = {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file()}
    assert any(p.name.startswith("part-") for p in files)
    second = _scan_json(capsys, str(data), "--state", str(state))
    assert second["resumed_from"] == second["records"] == 17
    assert {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file()} == files  # nothing rewritten
    assert second["verdicts"] == first["verdicts"] and second["examples"] == first["examples"]


def test_default_state_lives_next_to_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path)
    r = _scan_json(capsys, str(data))
    assert Path(r["state_dir"]).parent == data / ".nearstep-data"
    assert _scan_json(capsys, str(data))["records"] == 17  # its own state is not read as a document


def test_jsonl_bad_line_is_a_counted_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _jsonl(tmp_path / "train.jsonl")
    r = _scan_json(capsys, str(src))
    assert r["records"] == 7
    assert (r["verdicts"]["kept"], r["verdicts"]["exact"], r["verdicts"]["near"], r["verdicts"]["bad_record"]) == (4, 1, 1, 1)
    assert r["skips"] == [{"index": 5, "where": "train.jsonl:6", "reason": "bad_record", "detail": r["skips"][0]["detail"]}]


def test_held_finds_planted_leaks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path)
    held = tmp_path / "held.jsonl"
    rows = [_text(3) + "\n" + FOOTER, _near(_text(4)), _text(500), _text(501), _text(502)]
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    r = _scan_json(capsys, str(data), "--state", str(tmp_path / "st"), "--held", str(held))
    leak = r["leakage"]
    assert leak["held_documents"] == 5 and leak["leaked"] == 2 and leak["exact"] == 1
    found = {(x["held_where"], x["train_where"]) for x in leak["leaks"]}
    assert found == {("held.jsonl:1", "a/03.txt"), ("held.jsonl:2", "a/04.txt")}
    assert all(x["similarity"] >= 0.8 for x in leak["leaks"])
    rc, out, _ = _run(capsys, "scan", str(data), "--state", str(tmp_path / "st"), "--held", str(held))
    assert rc == 0 and "leakage: 2 of 5 held documents" in out and "held.jsonl:2  ~  a/04.txt" in out


def test_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    data = _folder(tmp_path)
    png = tmp_path / "scan.png"
    r = _scan_json(capsys, str(data), "--state", str(tmp_path / "st"), "--png", str(png))
    assert r["png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_says_so_and_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    src = _jsonl(tmp_path / "train.jsonl")
    png = tmp_path / "scan.png"
    rc, out, err = _run(capsys, "scan", str(src), "--png", str(png))
    assert rc == 0 and "kept        4" in out
    assert "matplotlib is not installed" in err and not png.exists()


def test_dedup_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path)
    out = tmp_path / "clean"
    rc, stdout, err = _run(capsys, "dedup", str(data), str(out), "--state", str(tmp_path / "st"))
    assert rc == 0, err
    assert stdout.count("\n") == 1 and "kept 12 of 17 records" in stdout
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [f"a/{i:02d}.txt" for i in range(12)]
    texts = [(out / f).read_text() for f in files]
    assert len({" ".join(t.lower().split()) for t in texts}) == 12
    assert not any(FOOTER in t for t in texts)
    assert (out / "a" / "00.txt").read_text() == _text(0) and (out / "a" / "03.txt").read_text() == _text(3)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    # The copy is a corpus again, with nothing left to remove.
    r = _scan_json(capsys, str(out), "--state", str(tmp_path / "st2"))
    assert r["records"] == 12 and r["verdicts"]["kept"] == 12 and r["boilerplate_lines"] == 0


def test_dedup_folder_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path)
    out = tmp_path / "clean"
    rc, _, err = _run(capsys, "dedup", str(data), str(out), "--policy", "weight", "--state", str(tmp_path / "st"))
    assert rc == 0, err
    weights = json.loads((out / WEIGHTS_FILE).read_text())
    assert len(weights) == 13 and (out / "b" / "near.txt").is_file()  # the near copy is kept, weighted
    assert weights["a/01.txt"] == weights["b/near.txt"] == 0.5
    assert weights["a/00.txt"] == 1.0  # exact copies are dropped, not weighted


def test_dedup_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "out" / "clean.jsonl"
    rc, stdout, err = _run(capsys, "dedup", str(src), str(out))
    assert rc == 0, err
    assert "kept 4 of 7 records" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert all(set(r) == {"id", "text"} for r in rows)
    assert rows[1]["text"] == _text(101)
    # Weighted: the near copy stays, both halves of its cluster weigh 0.5; the exact copy goes.
    out2 = tmp_path / "weighted.jsonl"
    assert _run(capsys, "dedup", str(src), str(out2), "--policy", "weight")[0] == 0
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [(r["id"], r["weight"]) for r in rows] == [(0, 1.0), (1, 0.5), (2, 1.0), (3, 1.0), (6, 0.5)]
    assert rows[-1]["lang"] == "xx"


def test_dedup_folder_to_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path)
    out = tmp_path / "clean.jsonl"
    assert _run(capsys, "dedup", str(data), str(out), "--state", str(tmp_path / "st"))[0] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [f"a/{i:02d}.txt" for i in range(12)]
    assert all(r["folder"] == "a" for r in rows)


def test_dedup_refusals_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _folder(tmp_path)
    listing = sorted(data.rglob("*"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for out in (taken, data / "out", data, tmp_path):
        rc, stdout, err = _run(capsys, "dedup", str(data), str(out))
        assert rc == 2 and stdout == "" and err.count("\n") == 1 and "Traceback" not in err, (out, err)
    assert sorted(data.rglob("*")) == listing  # no state, no output inside the input
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    src = _jsonl(tmp_path / "train.jsonl")
    assert _run(capsys, "dedup", str(src), str(src))[0] == 2
    existing = tmp_path / "old.jsonl"
    existing.write_text("{}\n")
    assert _run(capsys, "dedup", str(src), str(existing))[0] == 2 and existing.read_text() == "{}\n"
    # --force replaces what is there (but never the input).
    rc, _, err = _run(capsys, "dedup", str(data), str(taken), "--force", "--state", str(tmp_path / "st"))
    assert rc == 0, err
    assert not (taken / "keep.txt").exists() and (taken / "a" / "00.txt").is_file()
    assert _run(capsys, "dedup", str(data), str(tmp_path), "--force")[0] == 2


def test_dataset_needs_a_jsonl_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "state.json").write_text(json.dumps({"_data_files": []}))
    (ds / "dataset_info.json").write_text("{}")
    rc, _, err = _run(capsys, "dedup", str(ds), str(tmp_path / "out"))
    assert rc == 2 and "ending in .jsonl" in err and not (tmp_path / "out").exists()


def test_dedup_dataset_to_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pa = pytest.importorskip("pyarrow")
    ds = tmp_path / "ds"
    ds.mkdir()
    texts = [_text(200), _text(201), _text(200), _text(202)]
    table = pa.table({"text": texts, "label": [0, 1, 2, 3]})
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (ds / "dataset_info.json").write_text("{}")
    out = tmp_path / "clean.jsonl"
    rc, _, err = _run(capsys, "dedup", str(ds), str(out))
    assert rc == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [0, 1, 3]


@pytest.mark.parametrize("case", ["missing", "format", "state", "held", "config"])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    src = _jsonl(tmp_path / "train.jsonl")
    (tmp_path / "notes.csv").write_text("a,b\n")
    argv = {
        "missing": ["scan", str(tmp_path / "nope")],
        "format": ["scan", str(tmp_path / "notes.csv")],
        "state": ["scan", str(src), "--state", str(src / "inside-a-file")],
        "held": ["scan", str(src), "--held", str(tmp_path / "nope.jsonl")],
        "config": ["scan", str(src), "--threshold", "1.5"],
    }[case]
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("nearstep data scan: ")
    if case == "state":
        assert "--state" in err


def test_the_nearstep_command_dispatches_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _jsonl(tmp_path / "train.jsonl")
    assert cli_main(["data", "scan", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 7
    assert cli_main(["data", "scan", str(tmp_path / "nope")]) == 2


def test_console_entry(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "train.jsonl")
    done = subprocess.run([sys.executable, "-m", "nearstep", "data", "scan", str(src), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["records"] == 7 and report["kept"] == 4 and report["clusters"] == 2
