"""What bench.run compares the systems with: the corpus and the model's FLOPs per token, the device's
matrix-multiply limit, a plain sentence-transformers loop, and the machine the run is on."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from load_tests.processes import ROOT

CORPUS_PATH = ROOT / "load_tests" / "corpus.txt"
FLOPS_FORMULA = (
    "FLOPs/token = 2 * N_linear + 4 * n_layers * L * d_model; N_linear = weights of every nn.Linear of the "
    "encoder layers (Q, K, V, O, FFN in and out; embeddings, biases, LayerNorm and the per-sequence pooler "
    "left out), L = mean tokens per text (special tokens included), 4*n_layers*L*d_model = the QK^T and "
    "attention*V products. Counted on real tokens: padding inside a batch is not useful work."
)


def load_corpus() -> tuple[list[str], list[str]]:
    """(every non-empty line, the one-sentence lines)."""
    lines = [line.strip() for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    sentences = [line for line in lines if ". " not in line and len(line) < 200]
    return lines, sentences


def served_model() -> tuple[str, str]:
    """(path, served name) of the service's first model: the embedded default unless MODEL_NAMES is set."""
    from runners.settings import load_settings

    spec = load_settings().models[0]
    return spec.name_or_path, spec.served_name


def model_facts(st_model: Any, sentences: list[str], corpus: list[str]) -> dict[str, Any]:
    import torch

    auto = st_model[0].auto_model
    cfg = auto.config
    layers = auto.encoder.layer if hasattr(auto, "encoder") else []
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    embedding = sum(p.numel() for p in auto.embeddings.parameters()) if hasattr(auto, "embeddings") else 0
    tokenizer = st_model.tokenizer
    max_len = st_model.max_seq_length

    def mean_tokens(texts: list[str]) -> float:
        ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
        return sum(map(len, ids)) / len(ids)

    n_layers, d_model = cfg.num_hidden_layers, cfg.hidden_size
    tokens_sentence, tokens_corpus = mean_tokens(sentences), mean_tokens(corpus)

    def flops(length: float) -> float:
        return 2 * linear + 4 * n_layers * length * d_model

    return {
        "n_layers": n_layers,
        "d_model": d_model,
        "d_ff": getattr(cfg, "intermediate_size", None),
        "parameters": sum(p.numel() for p in auto.parameters()),
        "embedding_parameters": embedding,
        "linear_parameters": linear,
        "mean_tokens_sentence": round(tokens_sentence, 2),
        "mean_tokens_corpus": round(tokens_corpus, 2),
        "flops_per_token_sentence": flops(tokens_sentence),
        "flops_per_token_corpus": flops(tokens_corpus),
        "formula": FLOPS_FORMULA,
    }


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": [round(v, 3) for v in values],
    }


def matmul_gflops(device: str, n: int, repeats: int, rounds: int) -> dict[str, Any]:
    """Throughput of an n×n×n matrix product in the dtype the model runs in on this device."""
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        a @ b
    sync()
    results = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        results.append(2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "threads": torch.get_num_threads(),
        "gflops_rounds": [round(x, 1) for x in results],
        "gflops_best": max(results),
        "gflops_median": statistics.median(results),
    }


def st_baseline(st_model: Any, pools: dict[str, list[str]], rounds: int, seconds: float) -> dict[str, Any]:
    """`model.encode(texts, batch_size=32)` over each pool, repeated to fill about `seconds` per round."""
    out: dict[str, Any] = {}
    for name, texts in pools.items():
        st_model.encode(texts[:64], batch_size=32, show_progress_bar=False)  # warm
        per_round = []
        for _ in range(rounds):
            done, t0 = 0, time.perf_counter()
            while True:
                st_model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
                done += len(texts)
                if time.perf_counter() - t0 >= seconds:
                    break
            per_round.append(done / (time.perf_counter() - t0))
        out[name] = {"texts_per_s": summarize(per_round), "texts": len(texts)}
    return out


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info
