"""Embedding images, and inputs made of texts and images, with CLIP-like models (`image_embed`).

An input is one or more parts (`EmbedQuery.contents`): `modality: image` gives each input one image
part; Cohere's `inputs` give each input its content parts, texts and images. Texts go to the model's
text tower, images to its vision tower (each tower has its own scheduler: they never share a
forward pass), concurrently. An input of one part gets that part's vector; an input of several gets
the mean of its parts' unit vectors. Then `dimensions` and `normalize` apply as for texts.

`usage` counts what the model read: each text's tokens, and each image's vision tokens (its patches,
plus the class token where the tower has one: 50 for CLIP ViT-B/32 at 224 pixels, 196 for SigLIP
at 224 / 16); /v1/models shows a model's `image_tokens`. Cohere's `billed_units` also gives
`images`, `image_tokens` and `text_tokens`.

Images are checked, decoded and put through the model's processor by runners.capabilities.images,
in the image pool (image_pool(): at most IMAGE_THREADS threads, one per CPU, never asyncio's default
executor, where texts are tokenized), before the model sees them; URLs are fetched by
runners.capabilities.image_urls, only when IMAGE_URLS=allow, and each is decoded as soon as its
bytes arrive, so only a few raw images are held at once.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import numpy as np

from runners.capabilities.embed import Embedding
from runners.capabilities.image_urls import ImageFetcher
from runners.capabilities.images import DecodedImage, decode, inline_bytes, is_url
from runners.capabilities.queries import EmbedQuery, Part
from runners.engine.loaded import LoadedModel
from runners.errors import BadRequest, PayloadTooLarge, ServiceError
from runners.vocabulary import DENSE, EMBED, IMAGE, IMAGE_EMBED, TEXT

IMAGE_THREADS = 4  # the image pool's threads, at most (and at most one per CPU)
_image_pool: ThreadPoolExecutor | None = None


def image_pool() -> ThreadPoolExecutor:
    """The threads that decode images and run the model's image processor: a pool of their own, so
    texts, which are tokenized in asyncio's default executor, never wait behind images."""
    global _image_pool
    if _image_pool is None:
        _image_pool = ThreadPoolExecutor(max(1, min(IMAGE_THREADS, os.cpu_count() or 1)),
                                         thread_name_prefix="image-decode")
    return _image_pool


class ImageEmbedding(Embedding):
    """The embedding capability, for inputs with images too (texts alone go to `Embedding`)."""

    async def embed(self, q: EmbedQuery) -> dict[str, Any]:
        if q.contents is None:
            return await super().embed(q)
        model, vectors, usage, _ = await self.content_matrix(q)
        data = await self.encoded(model, vectors, q, q.embedding_types[0], q.encoding_format == "base64")
        total = usage["text_tokens"] + usage["image_tokens"]
        return {
            "object": "list",
            "model": model.name,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }

    async def cohere_embed_counted(self, q: EmbedQuery) -> tuple[dict[str, Any], int]:
        if q.contents is None:
            return await super().cohere_embed_counted(q)
        model, vectors, usage, images = await self.content_matrix(q)
        embeddings = {t: await self.encoded(model, vectors, q, t) for t in q.embedding_types}
        answer = {
            "id": str(uuid.uuid4()),
            "response_type": "embeddings_by_type",
            "embeddings": embeddings,
            "texts": [p.value for parts in q.contents for p in parts if p.modality == TEXT],
            "images": [image.describe() for image in images],
            "meta": {"api_version": {"version": "2"}, "billed_units": {
                "input_tokens": usage["text_tokens"] + usage["image_tokens"], "images": len(images), **usage}},
        }
        return answer, 0  # not counted here: a text beside images is cut to the text tower's window

    # ---- the work ----

    async def content_matrix(self, q: EmbedQuery) -> tuple[LoadedModel, np.ndarray, dict[str, int], list[DecodedImage]]:
        """The inputs' vectors (after `dimensions` and normalization), the tokens read per modality, and
        what each image was (for Cohere's response)."""
        contents = q.contents or ()
        if q.chunking is not None or q.late_chunking:
            raise BadRequest("chunking and late_chunking cut long texts: send images and image+text inputs without them",
                             param="chunking", code="invalid_chunking")
        self._check_count(len(contents), "input")
        parts = [part for input_parts in contents for part in input_parts]
        images = [p for p in parts if p.modality == IMAGE]
        texts = [p for p in parts if p.modality == TEXT]
        self._check_items(len(parts), f"{len(contents)} inputs of {len(parts)} parts", "input")
        for i, input_parts in enumerate(contents):
            if not input_parts:
                raise BadRequest(f"input {i} has no content: send a text or an image", param="input", code="empty_input")
        if len(images) > self.settings.max_images:
            raise PayloadTooLarge(f"the request has {len(images)} images; the limit is MAX_IMAGES_PER_REQUEST="
                                  f"{self.settings.max_images}: split the request", param="input", code="too_many_images")
        model = self.registry.resolve(q.model, IMAGE_EMBED if images else EMBED)
        if q.outputs != (DENSE,):
            raise BadRequest("images have dense embeddings only: leave out `output`", param="output",
                             code="unsupported_capability")
        if q.dimensions is not None and model.dimensions is not None and q.dimensions > model.dimensions:
            raise BadRequest(f"dimensions={q.dimensions} is larger than the {model.dimensions} dimensions of "
                             f"{model.name!r}", param="dimensions")
        for part in texts:
            self._check_part_text(part)
        self._check_urls(images)
        text_values = await self._part_texts(model, q, texts) if texts else []
        prepared, decoded = await self._load_images(model, images) if images else ([], [])

        async def nothing() -> tuple[list[Any], int]:
            return [], 0

        (text_vectors, text_tokens), (image_vectors, image_tokens) = await asyncio.gather(
            self.registry.run(model, EMBED, text_values) if text_values else nothing(),
            self.registry.run(model, IMAGE_EMBED, prepared) if prepared else nothing(),
        )
        by_part = iter(text_vectors), iter(image_vectors)
        rows = []
        for input_parts in contents:
            vectors = [np.asarray(next(by_part[p.modality == IMAGE]), dtype=np.float32) for p in input_parts]
            if len(vectors) == 1:
                rows.append(vectors[0])
            else:  # texts and images of one input: the mean of their unit vectors
                rows.append(np.mean([v / max(float(np.linalg.norm(v)), 1e-12) for v in vectors], axis=0))
        matrix = self._shape(np.stack(rows).astype(np.float32), q)
        usage = {"text_tokens": int(text_tokens), "image_tokens": int(image_tokens)}
        self._account(model, IMAGE_EMBED if images else EMBED, len(contents), sum(usage.values()))
        return model, matrix, usage, decoded

    def _check_part_text(self, part: Part) -> None:
        """The checks every text gets (runners.capabilities.base), named by the part."""
        try:
            self._check_texts([part.value], "text")
        except ServiceError as exc:
            exc.message = exc.message.replace("'text[0]'", part.where)
            exc.args = (exc.message,)
            exc.param = part.where
            raise

    async def _part_texts(self, model: LoadedModel, q: EmbedQuery, parts: list[Part]) -> list[str]:
        """The text parts as the model reads them: prompted, cut from the start or refused when long."""
        texts = [p.value for p in parts]
        prompt = self._prompt(model, q.input_type, q.instruction, q.prompt_name)
        self._check_prompted(texts, prompt, "text")
        if q.truncate and q.truncate_left:
            texts, _ = await self._cut_start(model, texts, prompt)
        if prompt:
            texts = [prompt + t for t in texts]
        if not q.truncate:
            lengths = [len(ids) for ids in await asyncio.to_thread(model.tokenize, texts)]
            for part, n in zip(parts, lengths):
                if n > model.max_tokens:
                    raise PayloadTooLarge(f"{part.where} has {n} tokens; model {model.name!r} reads at most "
                                          f"{model.max_tokens}: shorten it or send truncate: true", param=part.where,
                                          code="text_too_long")
        return texts

    def _check_urls(self, images: list[Part]) -> None:
        """Every URL of the request may be fetched, or none is: refused before anything connects."""
        for part in images:
            if not is_url(part.value):
                continue
            if self.image_fetcher is None:
                raise BadRequest(
                    f"{part.where} is a URL, and this server does not fetch image URLs (IMAGE_URLS=deny, the default): "
                    "send the image inline as data:image/png;base64,... (or jpeg, webp, gif), or have the server "
                    "started with IMAGE_URLS=allow and IMAGE_URL_HOSTS=<the hosts to fetch from>",
                    param=part.where, code="image_urls_disabled")
            self.image_fetcher._check(part.value, part.where)

    @cached_property
    def image_fetcher(self) -> ImageFetcher | None:
        s = self.settings
        if not s.image_urls:
            return None
        return ImageFetcher(s.image_url_hosts, s.image_url_timeout_s, s.max_image_bytes, s.image_url_concurrency)

    async def _load_images(self, model: LoadedModel, parts: list[Part]) -> tuple[list[Any], list[DecodedImage]]:
        """Each image's bytes (inline, or fetched and decoded as they arrive), checked, decoded and put
        through the model's processor in the image pool; only the processed tensors stay. The first
        failure in input order is the answer, and the images after it are not worked on further."""
        limit, max_bytes, side = self.settings.max_image_pixels, self.settings.max_image_bytes, model.images
        pool, loop = image_pool(), asyncio.get_running_loop()

        def work(i: int, data: bytes | io.BytesIO | None) -> tuple[Any, DecodedImage]:
            try:
                if data is None:
                    data = inline_bytes(parts[i].value, parts[i].where, max_bytes)
                image = decode(data, parts[i].where, limit, side.resized_pixels)
                del data
                prepared = side.prepare(image.image)
                image.image = None  # the full-size pixels go now; the processed tensor stays
                return prepared, image
            except ServiceError:
                raise
            except Exception as exc:  # noqa: BLE001 - the processor failing on an image is the image's fault
                raise BadRequest(f"{parts[i].where}: the model's image processor cannot read it "
                                 f"({type(exc).__name__}: {str(exc)[:200]})", param=parts[i].where,
                                 code="invalid_image") from None

        async def one(i: int) -> tuple[Any, DecodedImage]:
            part = parts[i]
            if is_url(part.value):
                assert self.image_fetcher is not None
                return await self.image_fetcher.fetch(
                    part.value, part.where, lambda data: loop.run_in_executor(pool, work, i, data))
            return await loop.run_in_executor(pool, work, i, None)

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(parts))]
        try:
            results = [await task for task in tasks]  # in input order: the first failure is the answer
        finally:
            for task in tasks:
                task.cancel()  # after a failure (or a cancelled request) what has not started never does
            await asyncio.gather(*tasks, return_exceptions=True)
        return [r[0] for r in results], [r[1] for r in results]

    async def _warmup_images(self, model: LoadedModel) -> None:
        """One image through the vision tower, so the first image request meets a warm model."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, "PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        await self.embed(EmbedQuery(texts=None, token_ids=None, model=model.name,
                                    contents=((Part(IMAGE, uri, "warm-up image"),),)))

