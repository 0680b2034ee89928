"""What the service knows about a loaded model replica: its capabilities, window, dimensions,
prompts and labels, and its own tokenizer (for counting, decoding and TEI's `/tokenize`)."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field, fields
from typing import Any

from runners.models.phases import LoadPhases
from runners.settings import ModelSpec


@dataclass(kw_only=True)
class ModelCard:
    spec: ModelSpec
    # The runner: `encode_pre` tokenizes, `encode_core` runs the forward pass, `encode_post` splits
    # the results per item (Infinity's replica protocol; runners.engine.scheduler drives it).
    replica: Any
    pairs: bool = False  # the replica reads (query, document) pairs
    capabilities: frozenset[str]
    rerank_via: str | None = None  # one of vocabulary's rerank modes
    # A routed model (runners.models.routed): the tasks that choose a route (`input_type`, `prompt_name`).
    route_tasks: tuple[str, ...] = ()
    rerank_activation: str = "sigmoid"  # what a rerank score is without raw_scores: "sigmoid" or "identity"
    tokenizer: Any
    max_tokens: int
    dimensions: int | None = None
    kind: str = ""  # vocabulary's model kind, as runners.models.detect resolved it (load_card sets it)
    prompts: dict[str, str] = field(default_factory=dict)
    # sentence-transformers' default prompt (config_sentence_transformers.json): what `encode` applies
    # when no prompt is named; the model's own similarity (cosine, dot, euclidean, manhattan).
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None
    labels: list[str] = field(default_factory=list)
    multi_label: bool = False
    # Multi-output models (runners.models.multi_output): the outputs each item can ask for with a
    # MultiInput (vocabulary.OUTPUTS); empty for the classic replicas.
    outputs: tuple[str, ...] = ()
    token_dimensions: int | None = None  # size of each token vector
    tokens_normalized: bool = False  # token vectors are unit length (ColBERT, BGE-M3), or raw hidden states
    query_aware: bool = False  # ColBERT: queries must be sent as MultiInput(..., query=True)
    # CLIP-like models (runners.models.image): the replica of the vision tower, batched by a scheduler
    # of its own (`prepare` turns a decoded image into its input), and the tokens one image counts as.
    images: Any = None
    image_tokens: int | None = None
    # The replica takes runners.models.token_inputs.TokenRequest items: token ids as they are, and last-layer
    # token vectors per item (chunking, late chunking, token vectors of an ordinary embedding model).
    token_inputs: bool = False
    pooling: str | None = None  # mean, cls, max, lasttoken: the vector is that pooling of the token vectors, no more
    load_seconds: float = 0.0  # weights read and moved to device
    phases: LoadPhases = field(default_factory=LoadPhases)
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _frame: tuple[tuple[int, ...], tuple[int, ...]] | None = field(default=None, init=False, repr=False)
    # Long texts (chunking, late chunking) are tokenized by a copy of their own: a 100,000-token text takes
    # a second or more, and the other requests' counting and decoding must not wait for it.
    _long_tokenizer: Any = field(default=None, init=False, repr=False)
    _long_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def card_fields(self) -> dict[str, Any]:
        """This card's fields, to build a subclass (the engine's LoadedModel) from it."""
        return {f.name: getattr(self, f.name) for f in fields(ModelCard) if f.init}

    @property
    def name(self) -> str:
        return self.spec.served_name

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def tokenize(self, texts: list[str], *, special: bool = True) -> list[list[int]]:
        # Fast tokenizers are not safe to share between threads; this copy is ours alone.
        with self._tokenizer_lock:
            return self.tokenizer(texts, add_special_tokens=special, truncation=False)["input_ids"]

    def token_spans(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Each text's token ids without special tokens, and each token's character span (start, end)."""
        with self._long_lock:
            if self._long_tokenizer is None:
                with self._tokenizer_lock:
                    self._long_tokenizer = copy.deepcopy(self.tokenizer)
            enc = self._long_tokenizer(texts, add_special_tokens=False, truncation=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def special_frame(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The special tokens the tokenizer puts before and after a text's own tokens ([CLS] and [SEP]
        for BERT, the end-of-text token after a Qwen3 text): learnt once from a probe."""
        if self._frame is None:
            probe = "hello world"
            full, body = self.tokenize([probe])[0], self.tokenize([probe], special=False)[0]
            at = next((i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body), None)
            if at is None:
                raise ValueError(f"model {self.name!r}: its tokenizer changes a text's tokens when it adds special tokens")
            self._frame = (tuple(full[:at]), tuple(full[at + len(body):]))
        return self._frame

    def decode(self, ids: list[list[int]], skip_special: bool = True) -> list[str]:
        with self._tokenizer_lock:
            return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special)

    def token_details(self, texts: list[str], special: bool = True) -> list[list[dict[str, Any]]]:
        """Per token: id, text (the input's characters, or the token itself for special tokens),
        special, start and stop (character offsets), as TEI's `/tokenize` answers."""
        with self._tokenizer_lock:
            enc = self.tokenizer(texts, add_special_tokens=special, truncation=False, return_offsets_mapping=True,
                                 return_special_tokens_mask=True)
            pieces = [self.tokenizer.convert_ids_to_tokens(ids) for ids in enc["input_ids"]]
        out = []
        for text, ids, offsets, mask, tokens in zip(texts, enc["input_ids"], enc["offset_mapping"],
                                                    enc["special_tokens_mask"], pieces):
            row = []
            for tid, (start, stop), is_special, token in zip(ids, offsets, mask, tokens):
                spans = bool(stop > start) and not is_special
                row.append({"id": tid, "text": text[start:stop] if spans else token, "special": bool(is_special),
                            "start": start if spans else None, "stop": stop if spans else None})
            out.append(row)
        return out
