"""Two sources of the native codecs side by side: `nearstep bench io`'s per-format pass on one core,
each source in fresh processes, alternating A B B A ...; prints a table and writes JSON.

    python bench/codec_ab.py OLD_native.c src/nearstep/formats/native.c ROUNDS OUT.json

    python bench/codec_ab.py OLD_TREE/src src ROUNDS OUT.json

(`git show REV:src/nearstep/formats/native.c > OLD_native.c` gives an earlier source; a directory
instead of a .c file is a whole source tree, put first on the child's PYTHONPATH, for changes that
reach past native.c: `git worktree add /tmp/old REV` gives /tmp/old/src.) Each process builds its
source's library once (cached by its hash) before it times anything."""
import json, os, subprocess, sys, statistics
child = r'''
import sys, json, torch
from pathlib import Path
from nearstep.formats import native
if sys.argv[1].endswith(".c"):
    native._SOURCE = Path(sys.argv[1])
from nearstep.bench import io
torch.set_num_threads(1)
io.FORMATS = ("fp32","bf16-kahan","bf16-sr","8bit","bf16-kahan+8bit","bf16-sr+8bit","16bit","bf16-sr+16bit","fp8","bf16-sr+fp8")
io.UPDATE_ROUNDS = 3
r = io._race_formats(1 << 24, 1)
print(json.dumps({k: v["params_per_second"] for k, v in r.items()}))
'''
sources = {"before": sys.argv[1], "after": sys.argv[2]}
res = {k: [] for k in sources}
for i in range(int(sys.argv[3])):
    for k, src in (list(sources.items()) if i % 2 == 0 else list(sources.items())[::-1]):  # A B B A ...
        env = dict(os.environ)
        if os.path.isdir(src):
            env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, "-c", child, src], capture_output=True, text=True, check=True,
                             env=env).stdout
        res[k].append(json.loads(out.strip().splitlines()[-1]))
names = list(res["before"][0])
print(f"{'format':28s} {'before':>9s} {'vs fp32':>8s} {'after':>9s} {'vs fp32':>8s} {'after/before':>12s}")
summary = {}
for n in names:
    b = statistics.median(r[n] for r in res["before"]); a = statistics.median(r[n] for r in res["after"])
    bf = statistics.median(r[n] / r["fp32"] for r in res["before"]); af = statistics.median(r[n] / r["fp32"] for r in res["after"])
    summary[n] = {"before": b, "after": a, "before_vs_fp32": bf, "after_vs_fp32": af}
    print(f"{n:28s} {b/1e6:9.1f} {bf:8.2f} {a/1e6:9.1f} {af:8.2f} {a/b:12.2f}")
json.dump({"runs": res, "summary": summary}, open(sys.argv[4], "w"), indent=1)
