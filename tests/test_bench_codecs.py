"""``nearstep bench codecs`` at a tiny size: every codec row is timed, printed and written."""

from __future__ import annotations

import json

from nearstep.bench import codecs
from nearstep.formats import native


def test_bench_codecs_prints_a_table_and_writes_positive_timings(tmp_path, capsys) -> None:
    out = tmp_path / "codecs.json"
    assert codecs.main(["--numel", "65536", "--repeat", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["unit"] == "ns/element" and res["numel"] == 65536 and res["machine"]
    # Every codec, decode and encode (and the moments' encode without write-back), natively where the
    # native codecs are built and with the torch codecs.
    suffixes = ("", " (torch codecs)") if native.available() else (" (torch codecs)",)
    expected = {f"{label}: {op}{suffix}" for label, _, state in codecs.CASES for suffix in suffixes
                for op in ("decode", "encode") + (() if state == "master" else ("encode, decode_moments=False",))}
    assert set(res["codecs"]) == expected
    assert res["alternatives"]
    for row in (*res["codecs"].values(), *res["alternatives"].values()):
        assert row > 0
    printed = capsys.readouterr().out
    assert "ns/element" in printed
    for label in res["codecs"]:
        assert label in printed
