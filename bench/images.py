"""Image embedding throughput (issue 20): the service serving a CLIP-like model, one image a request,
POST /v1/embeddings with `modality: image`, in closed loops of 1 and 16 clients (--images-concurrency).

The model is the tiny CLIP of the tests (tests/checkpoints.py: 32-wide, 2-layer towers, 32 x 32
images), so the row measures what the service adds around a forward pass that costs little: the
base64, the checks, the decoding and the processor (runners.capabilities.images) and the vision
tower's scheduler. `--images-model` measures a real one (a folder or hub id, e.g.
openai/clip-vit-base-patch32 on a GPU). Every request is a 256 x 256 JPEG (about 20 KB) from a
pool of 32 different pictures.

    python -m bench.run --skip-sweep --skip-hol --skip-forward --skip-zero-cost   # this part alone
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import sys
from typing import Any

from bench.load import fmt
from bench.systems import HttpTarget, closed_loop, tree_cpu_seconds
from load_tests.processes import ROOT, ServerProcess, process_env

SERVED = "bench-clip"
PICTURES = 32
SIZE = (256, 256)


def pictures(count: int = PICTURES, size: tuple[int, int] = SIZE) -> list[str]:
    """`count` different JPEG data URIs: smooth gradients with noise, as photos compress."""
    import numpy as np
    from PIL import Image

    uris = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
        pixels = np.stack([x * rng.uniform(50, 250), y * rng.uniform(50, 250), (x + y) * rng.uniform(20, 120)], axis=-1)
        pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        uris.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


class ImageTarget(HttpTarget):
    """POST /v1/embeddings with one image a request."""

    async def send(self, uri: str) -> bool:
        response = await self.client.post(self.path, json={"input": [uri], "model": self.model, "modality": "image"})
        return response.status_code == 200 and len(response.json()["data"]) == 1

    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(base_url=self.url, limits=httpx.Limits(max_connections=256), timeout=120.0)


def tiny_clip(args: argparse.Namespace) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    import checkpoints

    return str(checkpoints.build_tiny_clip(args.scratch / "tiny-clip"))


async def images_part(args: argparse.Namespace) -> dict[str, Any]:
    model = args.images_model or tiny_clip(args)
    env = {"MODEL_NAMES": model, "SERVED_MODEL_NAMES": SERVED}
    if args.device != "cpu":
        env["DEVICE"] = args.device
    uris = pictures()
    out: dict[str, Any] = {
        "model": args.images_model or "tiny CLIP (tests/checkpoints.py: 32-wide 2-layer towers, 32 x 32 images)",
        "request": f"one {SIZE[0]} x {SIZE[1]} JPEG a request (~{sum(map(len, uris)) * 3 // 4 // len(uris) // 1000} KB), "
                   "POST /v1/embeddings with modality image, closed loop",
        "concurrency": args.images_concurrency, "rounds": args.rounds, "seconds_per_point": args.seconds,
        "points": {},
    }
    server = ServerProcess.bentoml(args.logs / "bench_images.log", env=process_env(env))
    target = ImageTarget("service", server.url, "/v1/embeddings", SERVED, server.proc.pid)
    try:
        out["ready_s"] = round(await asyncio.to_thread(server.wait_ready), 2)
        await target.start()
        await closed_loop(target.send, uris, max(args.images_concurrency), args.warmup_seconds)
        raw: dict[int, list[dict[str, Any]]] = {c: [] for c in args.images_concurrency}
        for _ in range(args.rounds):
            for c in args.images_concurrency:
                cpu0 = tree_cpu_seconds(server.proc.pid)
                point = await closed_loop(target.send, uris, c, args.seconds)
                point["server_cpu_ms_per_image"] = 1000 * (tree_cpu_seconds(server.proc.pid) - cpu0) / max(1, point["requests"])
                raw[c].append(point)
                print(f"  images, {c} clients: {point['texts_per_s']:.1f} images/s, p50 {point['p50_ms']:.1f} ms", flush=True)
    finally:
        await target.stop()
        await asyncio.to_thread(server.stop, 20.0)
    for c, points in raw.items():
        done = [p for p in points if p["requests"]]
        out["points"][str(c)] = {
            "images_per_s": round(statistics.median(p["texts_per_s"] for p in points), 1),
            "p50_ms": round(statistics.median(p["p50_ms"] for p in done), 2) if done else None,
            "p99_ms": round(statistics.median(p["p99_ms"] for p in done), 2) if done else None,
            "server_cpu_ms_per_image": round(statistics.median(p["server_cpu_ms_per_image"] for p in points), 2),
            "images_per_s_rounds": [round(p["texts_per_s"], 1) for p in points],
            "errors": sum(p["errors"] for p in points),
        }
    return out


def images_table(part: dict[str, Any]) -> list[str]:
    if not part.get("points"):
        return ["", f"Image embedding rows skipped: {part.get('skipped')}"]
    lines = ["", f"Image embedding: {part['model']}; {part['request']}", "",
             "| clients | images/s | p50 ms | p99 ms | server CPU ms/image |", "|---:|---:|---:|---:|---:|"]
    for c, p in part["points"].items():
        lines.append(f"| {c} | {fmt(p['images_per_s'])} | {fmt(p['p50_ms'])} | {fmt(p['p99_ms'])} | "
                     f"{fmt(p['server_cpu_ms_per_image'])} |")
    return lines
