"""The corpus command against running servers (`--server URL`, repeated): the texts go to each server's
`/v1/embeddings` (base64 bodies, no JSON floats) with bounded concurrency, the least busy server first,
and retries on 429, 502, 503, 504 and connection errors (after Retry-After when the server sends one, else
an exponential back-off; another server where there is one). Any other error stops the run with the
server's message. The same `submit(texts)` → future as runners.corpus.embedder.LocalEmbedder.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
from typing import Any

import numpy as np

from runners.corpus.embedder import DTYPES, EmbedOptions, LoopThread, SparseRows, slices
from runners.corpus.io import CorpusError

RETRY_STATUS = (429, 502, 503, 504)
MAX_BACKOFF_S = 30.0


class ServerEmbedder:
    def __init__(self, urls: list[str], options: EmbedOptions | None = None, *, concurrency: int = 4,
                 request_texts: int = 256, retries: int = 8, api_key: str | None = None, timeout_s: float = 600) -> None:
        import httpx

        if concurrency < 1 or request_texts < 1 or retries < 1:
            raise CorpusError("--concurrency, --request-texts and --retries take positive numbers")
        self.urls = [u.rstrip("/") for u in urls]
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise CorpusError(f"--server {url!r} is not an http:// or https:// URL")
        self.options = options or EmbedOptions()
        if self.options.prompt_name is not None:
            raise CorpusError("--prompt-name is not sent to servers: use --input-type query|document with --server")
        self.request_texts = request_texts
        self.retries = retries
        self.in_flight = dict.fromkeys(self.urls, 0)
        self.model_name: str | None = None
        self.dimensions: int | None = None
        self._loop = LoopThread("corpus-client")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

        async def setup() -> None:
            self._client = httpx.AsyncClient(headers=headers, timeout=timeout_s,
                                             limits=httpx.Limits(max_connections=concurrency * len(self.urls)))
            self._slots = asyncio.Semaphore(concurrency * len(self.urls))

        self._loop.call(setup())

    def metadata(self) -> dict[str, Any]:
        o = self.options
        return {"model": self.model_name or "", "dimensions": self.dimensions, "output": o.output,
                "embedding_type": o.embedding_type,
                "normalize": o.normalize, "input_type": o.input_type or "", "prompt_name": o.prompt_name or "",
                "servers": " ".join(self.urls)}

    def _body(self, texts: list[str]) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {"input": texts, "encoding_format": "base64", "embedding_type": o.embedding_type,
                                "normalize": o.normalize, "output": o.output}
        for key in ("model", "input_type", "dimensions"):
            if getattr(o, key) is not None:
                body[key] = getattr(o, key)
        return body

    def _pick(self, avoid: str | None) -> str:
        choices = [u for u in self.urls if u != avoid] or self.urls
        return min(choices, key=self.in_flight.__getitem__)

    async def _request(self, texts: list[str], offset: int) -> Any:
        import httpx

        body = self._body(texts)
        last_error, avoid = "", None
        for attempt in range(self.retries):
            async with self._slots:
                url = self._pick(avoid)
                self.in_flight[url] += 1
                try:
                    response = await self._client.post(url + "/v1/embeddings", json=body)
                except httpx.TransportError as exc:
                    response, last_error = None, f"{url}: {type(exc).__name__} {exc}"
                finally:
                    self.in_flight[url] -= 1
            if response is not None and response.status_code == 200:
                return self._decode(response.json(), len(texts), url)
            if response is not None and response.status_code not in RETRY_STATUS:
                raise CorpusError(f"{url} refused texts {offset}-{offset + len(texts) - 1} of the shard with "
                                  f"{response.status_code}: {response.text[:500]}")
            wait = min(MAX_BACKOFF_S, 0.25 * 2 ** attempt)
            if response is not None:
                last_error = f"{url}: {response.status_code} {response.text[:200]}"
                try:
                    wait = min(MAX_BACKOFF_S, float(response.headers.get("retry-after", wait)))
                except ValueError:
                    pass
            avoid = url
            await asyncio.sleep(wait)
        raise CorpusError(f"texts {offset}-{offset + len(texts) - 1} of the shard failed {self.retries} times "
                          f"(last: {last_error}): check the servers, then run again with --resume")

    def _decode(self, answer: dict[str, Any], count: int, url: str) -> Any:
        data = sorted(answer["data"], key=lambda d: d["index"])
        if len(data) != count:
            raise CorpusError(f"{url} answered {len(data)} embeddings for {count} texts")
        if self.options.output == "sparse":
            self.model_name = self.model_name or answer.get("model")
            return SparseRows((np.asarray(d["embedding"]["indices"], dtype=np.int32),
                               np.asarray(d["embedding"]["values"], dtype=np.float32)) for d in data)
        dtype = np.dtype(DTYPES[self.options.embedding_type]).newbyteorder("<")
        matrix = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=dtype) for d in data])
        self.model_name = self.model_name or answer.get("model")
        if self.options.embedding_type in ("float", "int8", "uint8"):
            self.dimensions = self.dimensions or matrix.shape[1]
        else:
            self.dimensions = self.dimensions or self.options.dimensions or matrix.shape[1] * 8
        return matrix.astype(dtype.newbyteorder("="), copy=False)

    async def embed_async(self, texts: list[str]) -> Any:
        parts = await asyncio.gather(*(self._request(texts[a:b], a) for a, b in slices(texts, self.request_texts)))
        if self.options.output == "sparse":
            return SparseRows(row for part in parts for row in part)
        return np.concatenate(parts)

    def submit(self, texts: list[str]) -> concurrent.futures.Future:
        return self._loop.submit(self.embed_async(texts))

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.submit(texts).result()

    def close(self) -> None:
        if not self._loop.loop.is_closed():
            self._loop.call(self._client.aclose())
        self._loop.close()
