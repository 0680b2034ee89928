"""Texts and images in one space, end to end: one server serving MiniLM, a tiny CLIP and a tiny SigLIP
(built here with random weights, runners.models.image through the real loading code), called with
httpx, the OpenAI SDK, the Cohere SDK and the RunPod worker. Vectors are checked against the model's
own `get_image_features` / `get_text_features` on its own processor's and tokenizer's output."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import checkpoints
import cohere
import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from test_image_inputs import encoded, many_scans_jpeg, png_bomb

from load_tests.processes import ServerProcess

TEXTS = ["a photo of a cat", "the dog", "a red cat sat on the blue mat by the river in paris with a lazy dog " * 2]
FORMATS = ["PNG", "JPEG", "WEBP", "GIF"]


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _tensor(out):
    """transformers 5's `get_*_features` return an output object whose `pooler_output` is the projection."""
    return out if hasattr(out, "numpy") else out.pooler_output


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """Smooth gradients with noise: lossy formats keep them close to the original. Each channel runs in
    a direction of its own: SigLIP's processor squashes every image to 32 x 32, and gradients along
    fixed axes came out as near copies (two of the five at pixel cosine 0.98, 0.99+ from the tiny tower)."""
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.meshgrid(np.linspace(-0.5, 0.5, w), np.linspace(-0.5, 0.5, h))
    base = 128 + x[..., None] * rng.uniform(-220, 220, 3) + y[..., None] * rng.uniform(-220, 220, 3)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def as_uri(data: bytes, fmt: str) -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()


# Five images of different sizes and formats: what the server decodes is what the reference decodes.
IMAGES = [encoded(picture(i, size), fmt) for i, (size, fmt) in
          enumerate(zip([(40, 30), (64, 64), (33, 50), (120, 45), (31, 31)], FORMATS + ["PNG"]))]
URIS = [as_uri(data, fmt) for data, fmt in zip(IMAGES, FORMATS + ["PNG"])]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("image-models")
    return {"clip": checkpoints.build_tiny_clip(base / "tiny-clip"),
            "siglip": checkpoints.build_tiny_siglip(base / "tiny-siglip")}


@pytest.fixture(scope="module")
def server(start_server, models: dict[str, Path], default_model_path: str) -> ServerProcess:
    return start_server({"MODEL_NAMES": f"{default_model_path};{models['clip']};{models['siglip']}",
                         "SERVED_MODEL_NAMES": "minilm;clip;siglip", "BATCH_SIZES": "8",
                         "MAX_IMAGE_BYTES": "200000", "MAX_IMAGES_PER_REQUEST": "16"})


class Reference:
    """The model's own features, normalized, from its own tokenizer and processor."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
        self.siglip = self.model.config.model_type == "siglip"

    def images(self, blobs: list[bytes]) -> np.ndarray:
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
        with torch.no_grad():
            out = self.model.get_image_features(**self.processor(images=pictures, return_tensors="pt"))
        return np.stack([unit(v) for v in _tensor(out).numpy()])

    def texts(self, texts: list[str], padding: str | None = None) -> np.ndarray:
        padding = padding or ("max_length" if self.siglip else "longest")
        features = self.tokenizer(texts, padding=padding, truncation=True, return_tensors="pt",
                                  max_length=self.tokenizer.model_max_length)
        with torch.no_grad():
            out = self.model.get_text_features(**features)
        return np.stack([unit(v) for v in _tensor(out).numpy()])


@pytest.fixture(scope="module")
def references(models) -> dict[str, Reference]:
    return {name: Reference(path) for name, path in models.items()}


def embed(server: ServerProcess, body: dict, path: str = "/embed") -> dict:
    res = httpx.post(server.url + path, json=body, timeout=60)
    assert res.status_code == 200, res.text
    return res.json()


def vectors(body: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])


def test_models_list_image_embed(server):
    by_id = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert "image_embed" not in by_id["minilm"]["capabilities"]
    for name, tokens in (("clip", 65), ("siglip", 64)):
        assert by_id[name]["capabilities"] == ["embed", "image_embed"]
        assert by_id[name]["image_tokens"] == tokens and by_id[name]["dimensions"] == 32


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_image_vectors_equal_the_model_alone_and_batched(server, references, name):
    want = references[name].images(IMAGES)
    assert max(cosine(want[i], want[j]) for i in range(5) for j in range(i)) < 0.99, "images too alike to tell apart"
    batched = embed(server, {"model": name, "modality": "image", "input": URIS})
    assert batched["usage"]["prompt_tokens"] == 5 * (65 if name == "clip" else 64)
    alone = [vectors(embed(server, {"model": name, "modality": "image", "input": uri}))[0] for uri in URIS]
    for got_batched, got_alone, expected in zip(vectors(batched), alone, want):
        assert cosine(got_batched, expected) >= 0.999 and cosine(got_alone, expected) >= 0.999
        assert abs(np.linalg.norm(got_batched) - 1) < 1e-5


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_text_vectors_equal_the_model_alone_and_batched(server, references, name):
    ref = references[name]
    alone = [vectors(embed(server, {"model": name, "input": t}))[0] for t in TEXTS]
    batched = vectors(embed(server, {"model": name, "input": TEXTS}))
    for i, text in enumerate(TEXTS):
        expected = ref.texts([text])[0]
        assert cosine(alone[i], expected) >= 0.999 and cosine(batched[i], expected) >= 0.999
    assert cosine(batched[0], batched[1]) < 0.99
    if name == "siglip":
        # Padded to the batch's longest (Infinity's way), a short text gets another vector beside a long one.
        assert cosine(ref.texts(TEXTS[:2], padding="longest")[1], batched[1]) < 0.99


def test_clip_reads_its_whole_window(server, references):
    """77 tokens, the tokenizer's own maximum: not the 20 of `config.max_length` that Infinity cuts at."""
    text = " ".join(["cat dog"] * 60)
    got = embed(server, {"model": "clip", "input": text})
    assert got["usage"]["prompt_tokens"] == 77
    assert cosine(vectors(got)[0], references["clip"].texts([text])[0]) >= 0.999
    cut_at_20 = references["clip"].texts([" ".join(["cat dog"] * 9)])[0]
    assert cosine(vectors(got)[0], cut_at_20) < 0.999


def test_mixed_traffic_texts_and_images_at_once(server, references):
    """Text and image requests in flight together on both models: each answer equals its reference."""
    jobs = []
    for name in ("clip", "siglip"):
        jobs += [(name, "image", [URIS[i], URIS[(i + 2) % 5]], [i, (i + 2) % 5]) for i in range(5)]
        jobs += [(name, "text", [TEXTS[i % 3]], [i % 3]) for i in range(5)]
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: embed(server, {"model": j[0], "modality": j[1], "input": j[2]}), jobs))
    want = {(name, modality): references[name].images(IMAGES) if modality == "image" else
            np.stack([references[name].texts([t])[0] for t in TEXTS]) for name, modality, _, _ in jobs}
    for (name, modality, _, which), answer in zip(jobs, answers):
        for got, i in zip(vectors(answer), which):
            assert cosine(got, want[name, modality][i]) >= 0.999


def test_openai_sdk_with_extra_body(server, references):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    res = client.embeddings.create(model="clip", input=URIS[:2], extra_body={"modality": "image"})
    want = references["clip"].images(IMAGES[:2])
    assert [cosine(d.embedding, w) for d, w in zip(res.data, want)] >= [0.999, 0.999]
    assert res.usage.prompt_tokens == 130
    as_b64 = client.embeddings.create(model="clip", input=URIS[0], extra_body={"modality": "image"},
                                      encoding_format="base64")
    assert cosine(np.frombuffer(base64.b64decode(as_b64.data[0].embedding), "<f4"), want[0]) >= 0.999
    text = client.embeddings.create(model="clip", input="a photo of a cat").data[0].embedding
    assert cosine(text, references["clip"].texts(["a photo of a cat"])[0]) >= 0.999


def test_jina_objects_mix_texts_and_images(server, references):
    got = embed(server, {"model": "siglip", "input": [{"text": TEXTS[0]}, {"image": URIS[1]},
                                                      {"image": base64.b64encode(IMAGES[2]).decode()}]}, "/v1/embeddings")
    ref = references["siglip"]
    want = [ref.texts(TEXTS[:1])[0], *ref.images(IMAGES[1:3])]
    assert all(cosine(g, w) >= 0.999 for g, w in zip(vectors(got), want))
    assert got["usage"]["prompt_tokens"] == len(ref.tokenizer(TEXTS[0])["input_ids"]) + 2 * 64


def test_cohere_sdk_images_and_inputs(server, references):
    co = cohere.ClientV2(base_url=server.url, api_key="unused")
    res = co.embed(model="clip", input_type="image", images=[URIS[0]], embedding_types=["float", "int8", "ubinary"])
    want = references["clip"].images(IMAGES)
    assert cosine(res.embeddings.float_[0], want[0]) >= 0.999
    assert len(res.embeddings.int8[0]) == 32 and len(res.embeddings.ubinary[0]) == 4
    image = res.images[0]
    assert (image.width, image.height, image.format, image.bit_depth) == (40, 30, "png", 8)
    assert res.meta.billed_units.images == 1 and res.meta.billed_units.input_tokens == 65
    inputs = [cohere.EmbedInput(content=[cohere.TextEmbedContent(text=TEXTS[0]),
                                         cohere.ImageUrlEmbedContent(image_url=cohere.EmbedImageUrl(url=URIS[3]))]),
              cohere.EmbedInput(content=[cohere.ImageUrlEmbedContent(image_url=cohere.EmbedImageUrl(url=URIS[1]))])]
    res = co.embed(model="clip", input_type="search_document", inputs=inputs, embedding_types=["float"])
    text = references["clip"].texts(TEXTS[:1])[0]
    # one vector per input: the mean of its parts' unit vectors, normalized
    assert cosine(res.embeddings.float_[0], unit(text) + unit(want[3])) >= 0.999
    assert cosine(res.embeddings.float_[1], want[1]) >= 0.999
    assert res.meta.billed_units.image_tokens == 130


class Origin(http.server.ThreadingHTTPServer):
    """A web server on 127.0.0.1 that records every request it gets."""

    daemon_threads = True

    def __init__(self) -> None:
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                origin.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(IMAGES[0])))
                self.end_headers()
                self.wfile.write(IMAGES[0])

        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[str] = []


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_urls_are_refused_by_default_and_nothing_is_fetched(server, origin):
    url = f"http://127.0.0.1:{origin.server_address[1]}/cat.png"
    for path, body in (("/embed", {"model": "clip", "modality": "image", "input": [URIS[0], url]}),
                       ("/v1/embeddings", {"modality": "image", "input": url}),
                       ("/v2/embed", {"model": "clip", "input_type": "image", "images": [url]}),
                       ("/v1/embeddings", {"input": [{"image": url}]})):
        res = httpx.post(server.url + path, json=body)
        assert res.status_code == 400, res.text
        error = res.json()["error"]
        assert error["code"] == "image_urls_disabled" and "IMAGE_URLS=allow" in error["message"]
        assert "IMAGE_URL_HOSTS" in error["message"]
    assert origin.requests == []


def test_bad_images_are_4xx_and_spare_the_others(server):
    png = IMAGES[0]
    cases = [
        ([URIS[0], as_uri(png_bomb(), "png")], 413, "input[1] is 10000 x 5000 pixels"),
        ([as_uri(IMAGES[4][:-60], "png")], 400, "input[0] is a PNG image that does not decode"),
        ([URIS[1], as_uri(b"GIF89a" + b"\0" * 20, "gif")], 400, "input[1] is not a readable GIF image"),
        ([as_uri(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "png")], 400, "input[0] is not a PNG, JPEG, WebP or GIF"),
        (["data:image/svg+xml;base64,PHN2Zy8+"], 400, "input[0] is a data:image/svg+xml URI"),
        (["a photo of a cat"], 400, "input[0] is neither a data:image"),
        ([as_uri(png * (200_000 // len(png) + 1), "png")], 413, "MAX_IMAGE_BYTES=200000"),
        ([URIS[0]] * 17, 413, "MAX_IMAGES_PER_REQUEST=16"),
    ]
    good = {"model": "clip", "modality": "image", "input": URIS}
    with cf.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(httpx.post, server.url + "/embed", json=good, timeout=60) for _ in range(4)]
        bads = [pool.submit(httpx.post, server.url + "/embed", json={"model": "clip", "modality": "image", "input": i},
                            timeout=60) for i, _, _ in cases]
        for future, (_, status, words) in zip(bads, cases):
            res = future.result()
            assert res.status_code == status and words in res.json()["error"]["message"], res.text
        assert all(f.result().status_code == 200 for f in goods)
    for body, status in (({"model": "minilm", "modality": "image", "input": URIS[0]}, 400),
                         ({"model": "clip", "modality": "image", "input": [1, 2]}, 422),
                         ({"model": "clip", "modality": "image", "input": URIS[0], "output": "sparse"}, 400),
                         ({"model": "clip", "input": [{"text": "a", "image": URIS[0]}]}, 422)):
        assert httpx.post(server.url + "/embed", json=body).status_code == status, body
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}
    res = httpx.post(server.url + "/v2/embed", json={"model": "clip", "input_type": "image",
                                                     "inputs": [{"content": [part]}]})
    assert res.status_code == 400 and "inputs[0].content[0]" in res.json()["error"]["message"]


def worker_rss_mb(server: ServerProcess) -> float:
    import psutil

    root = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def timed_post(url: str, body: dict, delay: float = 0.0) -> tuple[httpx.Response, float]:
    time.sleep(delay)
    started = time.perf_counter()
    res = httpx.post(url, json=body, timeout=60)
    return res, time.perf_counter() - started


def test_jpegs_of_thousands_of_scans_are_refused_at_once_and_texts_go_on(server):
    """Seconds of CPU each to decode (2,000 scans over 2048 x 2048 pixels, 57 KB): refused by their scan
    count before decoding; a text sent meanwhile does not wait behind them, and memory stays flat."""
    hostile = as_uri(many_scans_jpeg(), "jpeg")
    text = {"model": "minilm", "input": ["a lone query"]}
    timed_post(server.url + "/embed", text)  # warm
    before = worker_rss_mb(server)
    bodies = [{"model": "clip", "modality": "image", "input": [URIS[0], hostile, hostile]} for _ in range(4)]
    with cf.ThreadPoolExecutor(6) as pool:
        bads = [pool.submit(timed_post, server.url + "/embed", body) for body in bodies]
        lone = pool.submit(timed_post, server.url + "/embed", text, 0.05)
        for future in bads:
            res, took = future.result()
            assert res.status_code == 400 and took < 1.0, (res.text, took)
            error = res.json()["error"]
            assert error["code"] == "image_too_complex" and "input[1]" in error["message"], error
        res, took = lone.result()
        assert res.status_code == 200 and took < 1.5, (res.text, took)
    assert worker_rss_mb(server) - before < 50, (before, worker_rss_mb(server))


@pytest.fixture(scope="module")
def url_server(start_server, models: dict[str, Path]) -> ServerProcess:
    """Image URLs allowed from any host (a public address on port 80 or 443), with a short deadline."""
    return start_server({"MODEL_NAMES": str(models["clip"]), "SERVED_MODEL_NAMES": "clip", "IMAGE_URLS": "allow",
                         "IMAGE_URL_HOSTS": "*", "IMAGE_URL_TIMEOUT": "0.5"})


def test_urls_to_private_addresses_are_one_quick_error(url_server, origin):
    """Every URL that leads to this machine or the cloud's metadata address, in whatever form, is the
    same 400 within a second, and nothing reaches the local web server; a text goes on meanwhile."""
    urls = ["http://169.254.169.254/latest/meta-data/", "http://[64:ff9b:1::a9fe:a9fe]/latest",
            "http://[::a9fe:a9fe]/latest", "http://[::ffff:0:a9fe:a9fe]/latest", "http://[64:ff9b::a00:1]/",
            "http://[2002:a9fe:a9fe::1]/", "http://localhost/cat.png", "http://127.1/cat.png", "http://0x7f000001/"]
    text = {"model": "clip", "input": ["a lone query"]}
    timed_post(url_server.url + "/embed", text)
    with cf.ThreadPoolExecutor(len(urls) + 1) as pool:
        futures = {url: pool.submit(timed_post, url_server.url + "/embed",
                                    {"model": "clip", "modality": "image", "input": [URIS[0], url]}) for url in urls}
        lone = pool.submit(timed_post, url_server.url + "/embed", text, 0.05)
        shapes = set()
        for url, future in futures.items():
            res, took = future.result()
            assert res.status_code == 400 and took < 1.0, (url, res.text, took)
            error = res.json()["error"]
            assert error["code"] == "image_url_fetch_failed", (url, error)
            shapes.add(error["message"].replace(url, "URL"))
        assert len(shapes) == 1, shapes
        res, took = lone.result()
        assert res.status_code == 200 and took < 1.5, (res.text, took)
    port = origin.server_address[1]
    res = httpx.post(url_server.url + "/embed", json={"model": "clip", "modality": "image",
                                                      "input": f"http://127.0.0.1:{port}/cat.png"})
    assert res.status_code == 400 and f"IMAGE_URL_HOSTS lists '127.0.0.1:{port}'" in res.json()["error"]["message"]
    assert origin.requests == []


def test_runpod_jobs_take_the_same_fields(monkeypatch, models, references):
    """The RunPod handler, in this process with the tiny CLIP: the embed job and the OpenAI route take
    `modality` as the HTTP routes do, and a URL fails the job with the same message."""
    import asyncio
    from types import SimpleNamespace

    import runpod_adapter.handler as adapter
    from runners.capabilities.service import InferenceService
    from runners.settings import load_settings

    inference = InferenceService(load_settings({"MODEL_NAMES": str(models["clip"]), "SERVED_MODEL_NAMES": "clip"}))
    monkeypatch.setattr(adapter, "_service", SimpleNamespace(inference=inference, start_engines=inference.start))
    jobs = [{"modality": "image", "input": URIS[:2]},
            {"openai_route": "/v1/embeddings", "openai_input": {"model": "clip", "modality": "image", "input": URIS[2]}},
            {"modality": "image", "input": "https://example.com/a.png"}]

    async def run() -> list:
        try:
            return [await adapter.handler({"id": str(i), "input": job}) for i, job in enumerate(jobs)]
        finally:
            await inference.stop()

    native, openai_job, refused = asyncio.run(run())
    want = references["clip"].images(IMAGES[:3])
    assert all(cosine(g, w) >= 0.999 for g, w in zip(vectors(native), want))
    assert cosine(vectors(openai_job[0])[0], want[2]) >= 0.999
    assert refused["status_code"] == 400 and "IMAGE_URLS=allow" in refused["error"]


def test_the_documented_example_runs(server, tmp_path):
    """docs/api.md's Python example for images (OpenAI SDK and Cohere SDK), as written, against this server."""
    import os
    import re
    import subprocess
    import sys

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    block = re.search(r"```python\n(import base64\nimport os\n\nimport cohere\nfrom openai.*?)```", text, re.S).group(1)
    (tmp_path / "cat.jpg").write_bytes(encoded(picture(7, (80, 60)), "JPEG"))
    env = dict(os.environ, EMBED_URL=server.url, IMAGE_MODEL="clip", IMAGE=str(tmp_path / "cat.jpg"))
    out = subprocess.run([sys.executable, "-c", block], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cosine_line, cohere_line, inputs_line = out.stdout.split("\n")[:3]
    assert -1 <= float(cosine_line) <= 1 and cohere_line == "32 80 65.0" and inputs_line == "1"
