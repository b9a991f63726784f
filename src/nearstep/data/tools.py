"""``nearstep data scan|dedup``: the data filter as a command over a corpus on disk.

``nearstep data scan PATH`` runs the filter (:class:`nearstep.data.Filter`) over a
folder of ``.txt`` files, a ``.jsonl`` file or a dataset saved with ``datasets``'
``save_to_disk`` and prints what it found: the verdict counts, the skipped
records, the near-duplicate clusters with examples read back from the corpus,
the boilerplate lines and repetition removed, leakage into a held-out corpus
(``--held``), the LSH banding, memory per document and time. The scan's state is
kept next to the data (or in ``--state``), so a second scan of an unchanged
corpus replays it without hashing anything. ``--json`` prints the same as one
JSON object; ``--png`` draws the cluster sizes and what was removed.

``nearstep data dedup IN OUT`` writes the filtered copy in the input's format: a
folder of the kept texts under their relative paths (boilerplate lines removed,
``weights.json`` beside them under ``--policy weight``), or a JSONL file of the
kept records (their fields, the text field, and ``weight`` under ``--policy
weight``); a saved dataset is written as JSONL (OUT must end in ``.jsonl``). OUT is
written to ``OUT.tmp-<pid>`` and renamed into place when whole, so a crash never
leaves a partial OUT; it must not lie inside IN (nor contain it), and an OUT that
already holds something is replaced only with ``--force``.

Exit status: 0 done, 2 bad input (a path that does not exist, a format that is
not a corpus, a state folder that cannot be written, a refused OUT), with a
one-line message on stderr; 130 interrupted (the scan's progress is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import NearstepError
from .filters import RepetitionRules
from .scan import Filter, FilterConfig, Leak, Policy, ScanReport, Verdict
from .sources import ArrowCorpus, Corpus, DataError, FolderCorpus, JsonlCorpus, Record, open_corpus

__all__ = ["main", "scan_command", "dedup_command", "UsageError"]

SNIPPET_CHARS = 80
MEMBERS_SHOWN = 4  # members per example cluster
LEAKS_IN_JSON = 100
WEIGHTS_FILE = "weights.json"


class UsageError(NearstepError, ValueError):
    """The command cannot run as asked (a refused output path, a format it cannot write)."""


# -- arguments -------------------------------------------------------------------------------------------


def _filter_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("filter")
    g.add_argument("--threshold", type=float, default=0.8,
                   help="Jaccard similarity of word n-gram sets at which two documents are near duplicates (default 0.8)")
    g.add_argument("--num-perm", type=int, default=128, help="MinHash functions (default 128)")
    g.add_argument("--ngram", type=int, default=5, help="words per shingle (default 5)")
    g.add_argument("--policy", choices=[p.value for p in Policy], default=Policy.CAP.value,
                   help="cap: drop cluster members beyond --cap; weight: keep them with sample weights (default cap)")
    g.add_argument("--cap", type=int, default=1, help="kept documents (or total weight) per near-duplicate cluster (default 1)")
    bp = g.add_mutually_exclusive_group()
    bp.add_argument("--boilerplate-min-docs", type=int, default=5, metavar="N",
                    help="remove lines that occur in at least N documents (default 5)")
    bp.add_argument("--no-boilerplate", action="store_true", help="keep every line")
    g.add_argument("--no-repetition", action="store_true", help="do not drop documents dominated by repetition")
    g.add_argument("--text-field", default="text", help="the text field of JSONL records and dataset rows (default text)")
    g.add_argument("--state", default=None, metavar="DIR",
                   help="where the scan keeps its state (default next to the data); a second scan reuses it")
    return p


def _parser() -> argparse.ArgumentParser:
    common = _filter_options()
    parser = argparse.ArgumentParser(
        prog="nearstep data",
        description="Find and remove exact and near-duplicate documents, repetition and boilerplate lines in a "
                    "corpus (a folder of .txt files, a .jsonl file, or a dataset saved with save_to_disk). "
                    "Exit codes: 0 done, 2 bad input.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    scan = sub.add_parser("scan", parents=[common], help="print what the filter finds in a corpus",
                          description="Print what the filter finds in a corpus (nothing is written but its state).")
    scan.add_argument("path", help="the corpus")
    scan.add_argument("--held", default=None, metavar="PATH",
                      help="a held-out corpus: report its documents with a duplicate in PATH (leakage)")
    scan.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    scan.add_argument("--png", default=None, metavar="FILE", help="also draw cluster sizes and removals into a PNG")
    scan.add_argument("--examples", type=int, default=5, metavar="N",
                      help="example clusters, skips and leaks shown (default 5)")
    dedup = sub.add_parser("dedup", parents=[common], help="write the filtered copy of a corpus",
                           description="Write the kept records of IN to OUT in IN's format (a saved dataset as "
                                       "JSONL: OUT ending in .jsonl).")
    dedup.add_argument("input", metavar="IN", help="the corpus")
    dedup.add_argument("output", metavar="OUT", help="the filtered copy (a folder, or a .jsonl file)")
    dedup.add_argument("--force", action="store_true", help="replace an OUT that already holds something")
    return parser


def _config(args: argparse.Namespace) -> FilterConfig:
    return FilterConfig(
        threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram, policy=Policy(args.policy), cap=args.cap,
        boilerplate_min_docs=None if args.no_boilerplate else args.boilerplate_min_docs,
        repetition=None if args.no_repetition else RepetitionRules())


# -- helpers -----------------------------------------------------------------------------------------------


def _kind(corpus: Corpus) -> str:
    if isinstance(corpus, FolderCorpus):
        return f"folder of {len(corpus):,} text files"
    if isinstance(corpus, JsonlCorpus):
        return "JSONL file"
    if isinstance(corpus, ArrowCorpus):
        return "saved dataset"
    return type(corpus).__name__


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"  # unreachable


def _share(part: int, whole: int) -> str:
    if not whole:
        return "-"
    pct = 100.0 * part / whole
    return f"{pct:.2g}%" if 0 < pct < 0.1 else f"{pct:.1f}%"


def _snippet(text: str, chars: int = SNIPPET_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: chars - 1] + "…"


def _read_texts(corpus: Corpus, indices: set[int]) -> dict[int, str]:
    """The texts of a few records, read back by walking the corpus from the first of them to the last."""
    if not indices:
        return {}
    out: dict[int, str] = {}
    last = max(indices)
    for item in corpus.records(min(indices)):
        if item.index > last:
            break
        if isinstance(item, Record) and item.index in indices:
            out[item.index] = item.text
            if len(out) == len(indices):
                break
    return out


def _open(path: str | os.PathLike, text_field: str, role: str) -> Corpus:
    """The corpus at ``path``, with a message that says what to give when there is none."""
    if not Path(path).exists():
        raise DataError(f"{role} {os.fspath(path)} does not exist; give a folder of .txt files, a .jsonl file "
                        f"or a dataset saved with save_to_disk")
    return open_corpus(path, text_field=text_field)


def _examples(filt: Filter, report: ScanReport, clusters: int) -> list[dict[str, Any]]:
    """The largest clusters with the place, verdict and first characters of a few of their members."""
    if clusters <= 0 or not report.clusters:
        return []
    big = filt.report(largest=clusters).largest
    verdict = filt.verdicts()
    wanted = {i for c in big for i in c["members"][:MEMBERS_SHOWN]}
    texts = _read_texts(filt.corpus, wanted)
    out = []
    for c in big:
        members = []
        for i in c["members"][:MEMBERS_SHOWN]:
            members.append({"index": i, "where": filt.corpus.where(i), "verdict": Verdict(int(verdict[i])).name.lower(),
                            "text": _snippet(texts.get(i, ""))})
        out.append({"size": c["size"], "members": members})
    return out


def _leakage(filt: Filter, held_path: str, text_field: str) -> dict[str, Any]:
    held = _open(held_path, text_field, "--held")
    documents = sum(1 for item in held.records(0) if isinstance(item, Record))
    leaks: list[Leak] = filt.leaks(held)
    return {
        "held": held.name,
        "held_documents": documents,
        "leaked": len(leaks),
        "exact": sum(1 for x in leaks if x.similarity >= 1.0),
        "leaks": [{"held": x.held, "held_where": x.held_where, "train": x.train, "train_where": x.train_where,
                   "similarity": round(float(x.similarity), 4)} for x in leaks[:LEAKS_IN_JSON]],
    }


def _plot(report: ScanReport, path: str) -> str | None:
    """Draw the PNG; returns why not when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG written"
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    left, right = fig.subplots(1, 2)
    sizes = sorted(report.cluster_sizes.items())
    if sizes:
        xs_sizes, counts = [s for s, _ in sizes], [n for _, n in sizes]
        if len(sizes) <= 12:  # few sizes: one labelled bar each
            left.bar([str(s) for s in xs_sizes], counts, color="#4c72b0", width=0.6)
            for x, n in enumerate(counts):
                left.text(x, n, f"{n:,}", ha="center", va="bottom", fontsize=8)
        else:  # many: sizes on a log axis
            left.bar(xs_sizes, counts, color="#4c72b0", width=[0.6 * max(1.0, s * 0.1) for s in xs_sizes])
            left.set_xscale("log")
        left.set_yscale("log")
        left.set_ylim(0.8, 3 * max(counts))
    else:
        left.text(0.5, 0.5, "no clusters", ha="center", va="center", transform=left.transAxes)
    left.set_xlabel("cluster size (documents)")
    left.set_ylabel("clusters (log)")
    left.set_title(f"{report.clusters:,} clusters, {report.clustered_docs:,} documents in them")
    v = report.verdicts
    skipped = v.get("empty", 0) + v.get("unreadable", 0) + v.get("bad_record", 0)
    bars = [("exact\ndocs", v.get("exact", 0)), ("near\ndocs", v.get("near", 0)),
            ("repetition\ndocs", v.get("repetition", 0)), ("boilerplate\nlines", report.boilerplate_lines),
            ("boilerplate\nwords", report.boilerplate_words), ("skipped\ndocs", skipped)]
    xs = list(range(len(bars)))
    heights = [n for _, n in bars]
    right.bar(xs, heights, color=["#c44e52", "#dd8452", "#8172b3", "#55a868", "#55a868", "#937860"])
    right.set_xticks(xs, [name for name, _ in bars], fontsize=8)
    right.set_yscale("symlog", linthresh=1)
    right.set_ylim(0, 4 * max(max(heights), 1))
    for x, n in zip(xs, heights):
        right.text(x, max(n, 0), f"{n:,}", ha="center", va="bottom", fontsize=8)
    right.set_ylabel("count (symlog)")
    right.set_title(f"removed from {report.records:,} records")
    fig.suptitle(f"nearstep data scan: {report.corpus}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return None


def _text(report: ScanReport, extra: dict[str, Any], examples: int) -> str:
    lines: list[str] = []
    add = lines.append
    v = report.verdicts
    add(f"nearstep data scan: {report.corpus} ({extra['kind']})")
    add(f"  records     {report.records:,} ({_size(report.bytes)} of text), {report.invalid_utf8:,} with invalid UTF-8")
    add(f"  kept        {report.kept:,} ({_share(report.kept, report.records)})"
        + (f", {extra['weighted']:,} of them with weight < 1 (sum of weights {extra['weight_sum']:,.1f})"
           if extra.get("policy") == Policy.WEIGHT.value else ""))
    add("  verdicts    " + ", ".join(f"{name} {n:,}" for name, n in v.items()))
    skips = report.skips
    if skips:
        n_skips = sum(v.get(k, 0) for k in ("empty", "unreadable", "bad_record"))
        add(f"skipped: {n_skips:,} records" + (f" (first {min(examples, len(skips))})" if examples < n_skips else ""))
        for s in skips[:examples]:
            add(f"  {s['where']}  {s['reason']}" + (f": {s['detail']}" if s.get("detail") else ""))
    if report.clusters:
        dist = ", ".join(f"{n:,}x{size}" for size, n in sorted(report.cluster_sizes.items()))
        add(f"clusters: {report.clusters:,} with 2+ members, {report.clustered_docs:,} documents in them "
            f"(clusters x size: {dist})")
        for c in extra["examples"]:
            add(f"  a cluster of {c['size']}:")
            for m in c["members"]:
                add(f"    {m['where']}  [{m['verdict']}]  {m['text']!r}")
            if c["size"] > len(c["members"]):
                add(f"    ... and {c['size'] - len(c['members']):,} more")
    else:
        add("clusters: none (no exact or near duplicates)")
    total_words = report.kept_words + report.boilerplate_words
    if report.config.get("boilerplate_min_docs") is None:
        add("boilerplate: off")
    else:
        add(f"boilerplate: {report.boilerplate_lines:,} lines, {report.boilerplate_words:,} words removed from kept "
            f"documents ({_share(report.boilerplate_words, total_words)} of their words; lines in >= "
            f"{report.config['boilerplate_min_docs']} documents); {v.get('boilerplate', 0):,} documents left empty")
        for s in report.boilerplate_samples[:examples]:
            add(f"  in {s['documents']:>6,} documents: {_snippet(s['line'])!r}")
    if report.config.get("repetition") is None:
        add("repetition: off")
    else:
        rules = ", ".join(f"{rule} {n:,}" for rule, n in sorted(report.repetition_rules.items())) or "none"
        add(f"repetition: {v.get('repetition', 0):,} documents dropped (by rule: {rules})")
    leak = extra.get("leakage")
    if leak is not None:
        add(f"leakage: {leak['leaked']:,} of {leak['held_documents']:,} held documents "
            f"({_share(leak['leaked'], leak['held_documents'])}) have a duplicate in the scanned corpus "
            f"({leak['exact']:,} exact); held: {leak['held']}")
        for x in leak["leaks"][:examples]:
            add(f"  {x['held_where']}  ~  {x['train_where']}  similarity {x['similarity']:.2f}")
    add(f"LSH: {report.bands} bands x {report.rows} rows of {report.config['num_perm']} MinHash values for threshold "
        f"{report.config['threshold']}; false-positive area {report.false_positive_area:.4f}, "
        f"false-negative area {report.false_negative_area:.4f}")
    m = report.memory
    add(f"memory per document: {_size(m['held_bytes_per_doc'])} held during the scan (signature "
        f"{_size(m['signature_bytes_per_doc'])}, band index {_size(m['index_bytes_per_doc'])}, exact hashes "
        f"{_size(m['exact_bytes_per_doc'])}); line census {_size(m['census_bytes'])}")
    if report.resumed_from >= report.records and report.records:
        how = f"reused: all {report.records:,} records were already scanned, nothing hashed this time"
    elif report.resumed_from:
        how = f"resumed after {report.resumed_from:,} records scanned before"
    else:
        how = "fresh scan (the next one of this corpus and config reuses it)"
    add(f"time: {report.seconds:.2f} s deciding (saved with the state), {extra['wall_seconds']:.2f} s this run; "
        f"state {extra['state_dir']}: {how}")
    return "\n".join(lines)


# -- scan --------------------------------------------------------------------------------------------------


def scan_command(args: argparse.Namespace) -> int:
    """``nearstep data scan``: print (or ``--json``) what the filter finds."""
    if args.examples < 0:
        raise UsageError(f"--examples must be >= 0, got {args.examples}")
    config = _config(args)
    corpus = _open(args.path, args.text_field, "PATH")
    if args.held is not None:
        _open(args.held, args.text_field, "--held")  # a bad --held path fails before the scan
    filt = Filter(corpus, config, state_dir=args.state)
    t0 = time.perf_counter()
    report = filt.scan()
    wall = time.perf_counter() - t0
    extra: dict[str, Any] = {"kind": _kind(corpus), "state_dir": str(filt.state_dir), "wall_seconds": wall,
                             "policy": config.policy.value,
                             "examples": _examples(filt, report, args.examples)}
    if config.policy is Policy.WEIGHT:
        weights = filt.weights()
        extra["weighted"] = len(weights)
        extra["weight_sum"] = report.kept - len(weights) + sum(weights.values())
    if args.held is not None:
        extra["leakage"] = _leakage(filt, args.held, args.text_field)
    note = _plot(report, args.png) if args.png else None
    if args.json:
        out = report.to_dict()
        out.update({k: v for k, v in extra.items() if k != "policy"})
        out["kept"] = report.kept
        if args.png:
            out["png"] = None if note else str(args.png)
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(_text(report, extra, args.examples))
        if args.png and not note:
            print(f"wrote {args.png}")
    if note:
        print(f"nearstep data scan: {note}", file=sys.stderr)
    return 0


# -- dedup -------------------------------------------------------------------------------------------------


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _holds_something(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() and (not path.is_file() or path.stat().st_size > 0)


def _is_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _check_output(src: Path, dst: Path, as_folder: bool, force: bool) -> None:
    """Refuse an OUT inside IN, one containing IN, or one that holds something (without ``force``)."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise UsageError(f"{dst} is the input itself; give another OUT (the input is never overwritten)")
    if _inside(d, s):
        raise UsageError(f"{dst} is inside the input {src}; give an OUT outside it")
    if _inside(s, d):
        raise UsageError(f"{dst} contains the input {src}; replacing it would delete the input: give another OUT")
    if not dst.exists():
        return
    if not as_folder and dst.is_dir():
        raise UsageError(f"{dst} is a folder; give a file name ending in .jsonl for the filtered records")
    if _holds_something(dst) and not force:
        what = "folder is not empty" if dst.is_dir() else "file exists"
        raise UsageError(f"{dst}: the {what}; give another OUT or pass --force to replace it")


def _write_jsonl(f: Any, fields: dict[str, Any]) -> int:
    try:
        line = json.dumps(fields, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape in the input: keep it escaped
        line = json.dumps(fields, ensure_ascii=True).encode("ascii")
    f.write(line + b"\n")
    return len(line) + 1


def _place(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` to ``dst``, replacing what is there (moved aside first, removed last)."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(tmp, dst)
        return
    old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(tmp, dst)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def dedup_command(args: argparse.Namespace) -> int:
    """``nearstep data dedup IN OUT``: write the kept records in the input's format."""
    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise DataError(f"IN {src} does not exist; give a folder of .txt files, a .jsonl file or a dataset "
                        f"saved with save_to_disk")
    config = _config(args)
    jsonl_out = dst.name.endswith(".jsonl")
    if _is_dataset(src) and not jsonl_out:
        raise UsageError(f"{src} is a saved dataset, which is written as JSONL: give an OUT ending in .jsonl")
    as_folder = src.is_dir() and not _is_dataset(src) and not jsonl_out
    _check_output(src, dst, as_folder, args.force)
    corpus = _open(src, args.text_field, "IN")
    filt = Filter(corpus, config, state_dir=args.state)
    weighted = config.policy is Policy.WEIGHT
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    kept = text_out = written = 0
    try:
        if as_folder:
            tmp.mkdir()
            weights: dict[str, float] = {}
            for k in filt.records():
                target = tmp / k.where
                target.parent.mkdir(parents=True, exist_ok=True)
                data = k.text.encode("utf-8", "surrogatepass")
                target.write_bytes(data)
                kept += 1
                text_out += len(data)
                written += len(data)
                if weighted:
                    weights[k.where] = k.weight
            if weighted:
                blob = json.dumps(weights, indent=0, ensure_ascii=False).encode("utf-8")
                (tmp / WEIGHTS_FILE).write_bytes(blob)
                written += len(blob)
        else:
            with open(tmp, "wb") as f:
                for k in filt.records():
                    fields = dict(k.fields)
                    if isinstance(corpus, FolderCorpus):
                        fields = {"path": k.where, **fields}
                    fields[args.text_field] = k.text
                    if weighted:
                        fields["weight"] = k.weight
                    written += _write_jsonl(f, fields)
                    kept += 1
                    text_out += len(k.text.encode("utf-8", "surrogatepass"))
                f.flush()
                os.fsync(f.fileno())
        report = filt.report()  # after the records: under --policy cap they stream out of the scan itself
        _place(tmp, dst)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    v = report.verdicts
    dropped = ", ".join(f"{name} {n:,}" for name, n in v.items() if name != "kept" and n)
    extra = f", weights in {dst / WEIGHTS_FILE}" if as_folder and weighted else ""
    print(f"kept {kept:,} of {report.records:,} records ({dropped or 'nothing dropped'}); text {_size(report.bytes)} in, "
          f"{_size(text_out)} out; wrote {dst} ({_size(written)}){extra}")
    return 0


# -- entry -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``nearstep data scan PATH ...`` or ``nearstep data dedup IN OUT ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    prog = f"nearstep data {args.action}"
    try:
        return scan_command(args) if args.action == "scan" else dedup_command(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the scan's progress is kept and the next run resumes it", file=sys.stderr)
        return 130
    except (NearstepError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: {where}{exc.strerror or exc}; check that the paths exist and can be written "
              f"(--state DIR puts the scan's state elsewhere)", file=sys.stderr)
        return 2
