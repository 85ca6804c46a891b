"""Memory of sharded corpus encoding against corpus size: `python -m llara_fast.encode --corpus`
on Wikipedia corpora of each size (lead paragraphs, repeated with new ids past the 10,033 of the
sample), each in a fresh process; prints the max RSS it reports, which should not grow with the
corpus (it holds one shard's texts and vectors at a time).

    python benchmarks/bench_encode_memory.py [--sizes 1000,5000] [--shard-size 500] [--model debug]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

from llara_fast.data.sources import iter_wiki_sample


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--model", default="debug")
    a = ap.parse_args(argv)
    paras = list(iter_wiki_sample())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in a.sizes.split(",")):
            corpus = Path(tmp) / f"corpus{n}.jsonl"
            with open(corpus, "w") as f:
                for i, (title, text) in enumerate(islice(cycle(paras), n)):
                    f.write(json.dumps({"_id": f"w{i}", "title": title, "text": text}) + "\n")
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "llara_fast.encode", "--model", a.model, "--corpus", str(corpus),
                                "--out", str(Path(tmp) / f"emb{n}"), "--shard-size", str(a.shard_size), "--quiet"],
                               capture_output=True, text=True, check=False)
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            m = re.search(r"(\d+) passages in ([\d.]+)s, ([\d.]+) passages/s, max RSS (\d+) MiB", p.stderr)
            rows.append({"passages": int(m.group(1)), "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
                         "encode_s": float(m.group(2)), "passages_per_s": float(m.group(3)),
                         "max_rss_mib": int(m.group(4)), "wall_s": round(time.perf_counter() - t0, 1)})
            r = rows[-1]
            print(f"{r['passages']:>7} passages ({r['corpus_mb']} MB): max RSS {r['max_rss_mib']} MiB, "
                  f"{r['passages_per_s']} passages/s, wall {r['wall_s']}s", flush=True)
    print(json.dumps({"bench": "encode_memory", "model": a.model, "shard_size": a.shard_size, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
