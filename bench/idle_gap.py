"""What a pause between requests costs a forward pass: the zero-cost model's forward pass, handed to a
worker thread as the scheduler's forward thread gets it, back to back and after a pause of the caller.

At one connection every request finds the server idle: each of its stages (parse, tokenize, forward
pass, answer) starts on a thread that was waiting, on a core that was idle. This measures the forward
pass alone (timed inside the worker thread) in three cases: no pause, the caller sleeping 3 ms (as the
event loop waits for the client's next request), the caller spinning 3 ms (its core kept busy). The
difference between the first and the others is a floor of one-connection latency that no code on the
request's path removes.

    python -m bench.idle_gap                 # prints one JSON object
    python -m bench.idle_gap --out FILE      # and writes it
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXT = "A man is eating food on a bright sunny day."


def measure(rounds: int = 5, runs: int = 150, pause_s: float = 0.003) -> dict[str, Any]:
    from bench.gpu_model import build_zero_cost
    from runners.engine.loaded import load_model
    from runners.settings import default_model_path, load_settings

    with tempfile.TemporaryDirectory() as scratch:
        folder = build_zero_cost(Path(default_model_path()), Path(scratch) / "zero-cost")
        settings = load_settings({**os.environ, "MODEL_NAMES": str(folder), "DEVICE": "cpu"})
        replica = load_model(settings.models[0], settings).scheduler.replica
    features = replica.encode_pre([TEXT])
    import torch

    threads = torch.get_num_threads()
    jobs: queue.SimpleQueue[bool] = queue.SimpleQueue()
    took: queue.SimpleQueue[float] = queue.SimpleQueue()

    def worker() -> None:
        torch.set_num_threads(1)  # as the scheduler runs this model's batches
        while jobs.get():
            t0 = time.perf_counter()
            replica.encode_post(replica.encode_core(features))
            took.put(time.perf_counter() - t0)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    pauses = {"back_to_back": lambda: None, "caller_sleeps": lambda: time.sleep(pause_s),
              "caller_spins": lambda: spin(pause_s)}
    medians: dict[str, list[float]] = {name: [] for name in pauses}
    for _ in range(rounds):
        for name, pause in pauses.items():
            times = []
            for _ in range(runs):
                pause()
                jobs.put(True)
                times.append(took.get())
            medians[name].append(1000 * statistics.median(times))
    jobs.put(False)
    thread.join()
    torch.set_num_threads(threads)  # set_num_threads in the worker is where later threads of this process would start
    return {
        "what": "zero-cost model (1 layer, 32 wide), one text, forward pass + post-processing timed inside a "
                f"worker thread on 1 torch thread; median of {runs} per round, rounds interleaved",
        "pause_ms": 1000 * pause_s,
        "forward_ms": {name: round(statistics.median(v), 3) for name, v in medians.items()},
        "forward_ms_rounds": {name: [round(x, 3) for x in v] for name, v in medians.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=150)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args.rounds, args.runs)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
