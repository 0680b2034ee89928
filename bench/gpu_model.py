"""Build an all-MiniLM-L6-v2-shaped sentence-transformers folder with random weights, offline.

    python bench/gpu_model.py .gpu_bundle/model /tmp/minilm-random

Used by `bench/gpu_bench.sh` where the real weights (87 MiB) cannot travel: the copy of the model's
config, tokenizer and sentence-transformers files that `bench/gpu_prepare.py` made, plus weights drawn
from the config's initializer. Same layers, widths, vocabulary and tokenizer, so the same FLOPs per
token and the same token counts; the vectors are meaningless, which a throughput benchmark does not read.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def build(src: Path, dest: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModel

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(src)
    model = AutoModel.from_config(config)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
