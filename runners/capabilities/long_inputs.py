"""Inputs longer than the model's window (docs/api.md, "Long inputs"): chunking, late chunking, and
counting what truncation cut.

- Chunking: a text's tokens (no special tokens) are cut into windows of `size − reserved` tokens that
  overlap by `overlap`, where `reserved` is the model's special tokens plus the prompt's tokens; each
  window is sent to the model as token ids, wrapped in the special tokens (and the prompt after the
  leading ones), so it is embedded exactly as a text that tokenizes to those ids. All windows of a
  request go to the scheduler as one request of many items, batched with everything else.
- Late chunking: the inputs are consecutive pieces of one document joined with one space. The
  document runs through the model once when it fits the window; longer, in macro-windows of the
  window's room that overlap by a quarter of it, each token's vector taken from the first window that
  has a quarter window of context before it (the first window keeps all of its own). Each piece's
  vector is the mean of the last-layer vectors of the tokens whose character span overlaps the piece;
  the replica sums them per piece (runners.models.token_inputs labels), so only one sum per piece and
  window leaves the model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from runners.capabilities.base import Capability
from runners.capabilities.queries import Chunking, EmbedQuery
from runners.engine.loaded import LoadedModel
from runners.errors import BadRequest, PayloadTooLarge
from runners.models.token_inputs import TokenRequest
from runners.vocabulary import DENSE, EMBED

MACRO_OVERLAP = 4  # late chunking past the window: macro-windows overlap by 1/MACRO_OVERLAP of their room


@dataclass(frozen=True)
class Chunk:
    """One window of one input: token span over the text's own tokens (end exclusive), character span."""

    input: int
    start_token: int
    end_token: int
    start_char: int
    end_char: int

    def spans(self) -> dict[str, int]:
        return {"start_token": self.start_token, "end_token": self.end_token,
                "start_char": self.start_char, "end_char": self.end_char}


def windows(n: int, room: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token windows of at most `room` tokens over n tokens, neighbours sharing `overlap`."""
    if n <= room:
        return [(0, n)]
    out, start = [], 0
    while True:
        end = min(start + room, n)
        out.append((start, end))
        if end == n:
            return out
        start = end - overlap


def window_count(n: int, room: int, overlap: int) -> int:
    return 1 if n <= room else 1 + -(-(n - room) // (room - overlap))


class LongInputs(Capability):
    def _check_long_query(self, model: LoadedModel, q: EmbedQuery) -> None:
        """Which requests chunking and late chunking serve; a clear 400 for the others."""
        asked = "late_chunking" if q.late_chunking else "chunking"
        if q.late_chunking and q.chunking is not None:
            raise BadRequest("send chunking or late_chunking, not both: chunking embeds each window on its own, "
                             "late chunking reads the whole document once", param="chunking", code="invalid_chunking")
        if q.outputs != (DENSE,):
            raise BadRequest(f"{asked} gives dense vectors: leave `output` out (or send dense)", param="output",
                             code="invalid_chunking")
        if not model.token_inputs:
            raise BadRequest(f"model {model.name!r} cannot take {asked}: it is served for sentence-transformers and "
                             "ONNX embedding models (BACKEND torch or optimum), not for this model's kind",
                             param=asked, code="unsupported_capability")
        if q.late_chunking and model.pooling != "mean":
            how = f"by {model.pooling}" if model.pooling else "by more than a pooling of its token vectors"
            raise BadRequest(f"late_chunking needs a model whose vector is the mean of its token vectors; model "
                             f"{model.name!r} pools {how}: use chunking instead", param="late_chunking",
                             code="unsupported_capability")

    async def _frame(self, model: LoadedModel, prompt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(what goes before a text's tokens, what goes after): special tokens, the prompt's tokens after the
        leading ones."""
        def frame() -> tuple[tuple[int, ...], tuple[int, ...]]:
            try:
                before, after = model.special_frame()
            except ValueError as exc:
                raise BadRequest(f"{exc}: it cannot take chunking", code="unsupported_capability") from None
            prompt_ids = tuple(model.tokenize([prompt], special=False)[0]) if prompt else ()
            return before + prompt_ids, after

        return await asyncio.to_thread(frame)

    def _too_many(self, i: int, what: str, count: int) -> PayloadTooLarge:
        limit = self.settings.max_chunks_per_input
        return PayloadTooLarge(
            f"'input[{i}]' {what} makes {count} chunks; the limit is MAX_CHUNKS_PER_INPUT={limit}: "
            "send a shorter text, a larger chunking.size or less overlap", param="input", code="too_many_chunks")

    def _check_queue(self, model: LoadedModel, items: int) -> None:
        if items > self.settings.queue_size:
            raise PayloadTooLarge(f"this request makes {items} chunks, more than model {model.name!r} can queue "
                                  f"(INFINITY_QUEUE_SIZE={self.settings.queue_size}): split it", param="input",
                                  code="too_many_chunks")

    async def chunk_vectors(self, model: LoadedModel, texts: list[str], prompt: str,
                            chunking: Chunking) -> tuple[list[Chunk], np.ndarray, int]:
        """Every chunk of every text (in order) with the model's vector for it (raw, as the replica gives
        it), and the tokens the model read."""
        before, after = await self._frame(model, prompt)
        reserved = len(before) + len(after)
        size = chunking.size or model.max_tokens
        if size > model.max_tokens:
            raise BadRequest(f"chunking.size={size} is larger than the window of model {model.name!r} "
                             f"({model.max_tokens} tokens): send at most {model.max_tokens}, or leave it out",
                             param="chunking.size", code="invalid_chunking")
        room = size - reserved
        if room < 1:
            raise BadRequest(f"chunking.size={size} leaves no room for text: the model's special tokens and the prompt "
                             f"take {reserved}", param="chunking.size", code="invalid_chunking")
        if chunking.overlap >= room:
            raise BadRequest(f"chunking.overlap={chunking.overlap} must be smaller than the {room} text tokens of a "
                             f"chunk (size {size} less {reserved} special and prompt tokens)", param="chunking.overlap",
                             code="invalid_chunking")
        tokenized = await asyncio.to_thread(model.token_spans, texts)
        total = 0
        for i, (ids, _) in enumerate(tokenized):
            count = window_count(len(ids), room, chunking.overlap)
            if count > self.settings.max_chunks_per_input:
                raise self._too_many(i, f"has {len(ids)} tokens: in chunks of {room} text tokens it", count)
            total += count
        self._check_items(total, f"{len(texts)} texts in {total} chunks of {room} text tokens", "input")
        chunks: list[Chunk] = []
        items: list[TokenRequest] = []
        for i, (ids, spans) in enumerate(tokenized):
            for start, end in windows(len(ids), room, chunking.overlap):
                chars = (spans[start][0], spans[end - 1][1]) if end > start else (0, 0)
                window = before + tuple(ids[start:end]) + after
                if not window:
                    raise BadRequest(f"'input[{i}]' has no tokens (the tokenizer reads nothing in it)", param="input",
                                     code="empty_input")
                chunks.append(Chunk(i, start, end, *chars))
                items.append(TokenRequest(ids=window))
        self._check_queue(model, len(items))
        vectors, usage = await self.registry.run(model, EMBED, items)
        return chunks, np.asarray(np.stack(vectors), dtype=np.float32), int(usage)

    async def late_chunk_vectors(self, model: LoadedModel, pieces: list[str], prompt: str) -> tuple[np.ndarray, int]:
        """Per piece, the mean of its tokens' last-layer vectors (unnormalized), read in context of the
        whole document; and the tokens the model read."""
        before, after = await self._frame(model, prompt)
        room = model.max_tokens - len(before) - len(after)
        if room < 4:
            raise BadRequest(f"the prompt leaves model {model.name!r} no room for the document", param="input_type")
        starts: list[int] = []
        at = 0
        for piece in pieces:
            starts.append(at)
            at += len(piece) + 1
        document = " ".join(pieces)
        ids, spans = (await asyncio.to_thread(model.token_spans, [document]))[0]
        piece_of = _pieces_of_tokens(spans, starts, [s + len(p) for s, p in zip(starts, pieces)])
        overlap = room // MACRO_OVERLAP if len(ids) > room else 0
        macro = windows(len(ids), room, overlap)
        if len(macro) > self.settings.max_chunks_per_input:
            raise self._too_many(0, f"and the {len(pieces) - 1} pieces after it have {len(ids)} tokens: in "
                                    f"macro-windows of {room} tokens overlapping by {overlap} they", len(macro))
        items: list[TokenRequest] = []
        firsts: list[int] = []
        for w, (start, end) in enumerate(macro):
            own = start + (overlap if w else 0)
            owned = [p for p in piece_of[own:end] if p >= 0]
            first = min(owned) if owned else 0
            labels = [0] * len(before) + [0] * (own - start) + \
                     [p - first + 1 if p >= 0 else 0 for p in piece_of[own:end]] + [0] * len(after)
            firsts.append(first)
            items.append(TokenRequest(ids=before + tuple(ids[start:end]) + after, labels=tuple(labels)))
        outputs, usage = await self.registry.run(model, EMBED, items)
        sums = np.zeros((len(pieces), outputs[0].sums.shape[1] if outputs else 1), dtype=np.float64)
        for first, out in zip(firsts, outputs):
            sums[first:first + len(out.sums)] += out.sums
        counts = np.bincount([p for p in piece_of if p >= 0], minlength=len(pieces))
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise BadRequest(f"'input[{int(empty[0])}]' has no token of its own (the tokenizer reads nothing in it): "
                             "late chunking pools each piece's tokens, so every piece needs some", param="input",
                             code="empty_input")
        return (sums / counts[:, None]).astype(np.float32), int(usage)

    async def count_long(self, model: LoadedModel, texts: list[str]) -> int:
        """How many texts are longer than the window (the model reads their first tokens only). Every
        token reads at least one UTF-8 byte (a SentencePiece word start at most one more), so only
        texts with more bytes than the window are tokenized again to know."""
        limit = max(model.max_tokens - 8, 0)  # room for special tokens
        candidates = [t for t in texts if len(t) > limit or (4 * len(t) > limit and len(t.encode("utf-8")) > limit)]
        if not candidates:
            return 0
        lengths = await asyncio.to_thread(lambda: [len(ids) for ids in model.tokenize(candidates)])
        return sum(n > model.max_tokens for n in lengths)


def _pieces_of_tokens(spans: list[tuple[int, int]], starts: list[int], ends: list[int]) -> list[int]:
    """For each token (character span), the piece its span overlaps first (-1: none, e.g. a space)."""
    out, p = [], 0
    for a, b in spans:
        while p < len(starts) and ends[p] <= a:
            p += 1
        out.append(p if p < len(starts) and a < ends[p] and b > starts[p] else -1)
    return out
