"""Build sentence-transformers folders with random weights, offline, from a model's config and tokenizer.

    python bench/gpu_model.py .gpu_bundle/model /tmp/minilm-random          # all-MiniLM-L6-v2's shape
    python bench/gpu_model.py --zero-cost .gpu_bundle/model /tmp/zero-cost   # 1 layer, 32 wide (bench.run)

Used by `bench/gpu_bench.sh` where the real weights (87 MiB) cannot travel: the copy of the model's
config, tokenizer and sentence-transformers files that `bench/gpu_prepare.py` made, plus weights drawn
from the config's initializer. Same layers, widths, vocabulary and tokenizer, so the same FLOPs per
token and the same token counts; the vectors are meaningless, which a throughput benchmark does not read.

`--zero-cost` (bench.run's server-overhead rows) keeps the tokenizer, the mean pooling and the
normalization but shrinks the encoder to one layer 32 wide (2 heads, feed-forward 64): its forward
pass costs next to nothing, so what a server adds around it is what gets measured.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

# Everything of a sentence-transformers folder but the weights (bench/gpu_prepare.py carries these).
MODEL_FILES = ("config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json",
               "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "1_Pooling/config.json")
ZERO_COST_CONFIG: dict[str, Any] = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                    "intermediate_size": 64}


def build(src: Path, dest: Path, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Copy `src`'s config, tokenizer and sentence-transformers files to `dest` and save random weights there.

    `overrides` changes the model's config (widths, layers); the pooling config follows the new width.
    """
    import torch
    from transformers import AutoConfig, AutoModel

    if dest.exists():
        shutil.rmtree(dest)
    for name in MODEL_FILES:
        if (src / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dest / name)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(src)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    model = AutoModel.from_config(config)
    model.save_pretrained(dest, safe_serialization=True)
    pooling = dest / "1_Pooling" / "config.json"
    if pooling.is_file():
        spec = json.loads(pooling.read_text())
        spec["word_embedding_dimension"] = config.hidden_size
        pooling.write_text(json.dumps(spec, indent=2) + "\n")
    return dest


def build_zero_cost(src: Path, dest: Path, seed: int = 0) -> Path:
    """A 1-layer, 32-wide BERT with `src`'s tokenizer, mean pooling and normalization."""
    return build(src, dest, seed, ZERO_COST_CONFIG)


if __name__ == "__main__":
    argv = sys.argv[1:]
    zero_cost = "--zero-cost" in argv
    paths = [a for a in argv if a != "--zero-cost"]
    if len(paths) != 2:
        sys.exit(__doc__)
    src, dest = Path(paths[0]), Path(paths[1])
    print(build_zero_cost(src, dest) if zero_cost else build(src, dest))
