"""Sparse and multi-vector embeddings, all outputs of a model from one forward pass.

`MultiEncoder` is a model replica like the others (`encode_pre` tokenizes, `encode_core` runs the
model and its heads, `encode_post` splits the batch into per-item results), so `ModelScheduler`
batches it like any dense model. Kinds, set with MODEL_KINDS or found by `runners.models.detect`:

- `sparse` (SPLADE): a masked-LM checkpoint: config.json's architectures has `*ForMaskedLM` and
  the folder has no sentence-transformers modules.json, or a sentence-transformers SparseEncoder
  folder (MLMTransformer + SpladePooling). Weight of vocabulary entry v = max over the text's
  tokens of log(1 + relu(MLM logit of v)), as sentence-transformers' SpladePooling (its `sum`
  pooling and `log1p_relu` activation too). log1p∘relu is monotonic, so for max pooling the max
  is taken over the raw logits and the activation runs on the [batch, vocab] result only.
- `bge-m3`: an encoder with FlagEmbedding's heads beside its weights (`sparse_linear.pt`,
  `colbert_linear.pt`, as BAAI/bge-m3 ships them), formulas of FlagEmbedding's BGEM3FlagModel:
  dense = the CLS hidden state (then normalized when the folder's sentence-transformers modules
  end with Normalize, as bge-m3's do: what the classic embedding replica gives for the folder);
  sparse = relu(sparse_linear(h_t)) per token, max per token id,
  the tokenizer's cls/eos/pad/unk tokens left out, zeros dropped; tokens (ColBERT vectors) =
  normalize(colbert_linear(h_t)) for every token but the first (CLS), the final </s> included.
- `colbert`: a ColBERT checkpoint in one of two layouts: Stanford's `HF_ColBERT` (config.json
  architectures, `linear.weight` beside the `bert.*` weights, settings in `artifact.metadata`),
  or a PyLate folder (sentence-transformers modules.json: Transformer + a PyLate/ST Dense without
  activation; settings in config_sentence_transformers.json). Texts get the document marker after
  CLS ([unused1] / "[D] "), queries the query marker and are expanded with [MASK] tokens to the
  query length (attended or not, as the checkpoint says). Tokens = normalize(linear(h_t)): every
  position of a query up to the query length, the attended non-punctuation tokens of a document.
  (Infinity's own replica would serve an HF_ColBERT folder as raw hidden states: no projection,
  markers or normalization.)
- `tokens`: a plain (sentence-transformers) embedding model, opt-in: dense = its pooling (cls,
  mean, max or lasttoken) and Normalize module, the vector the classic replica gives; tokens =
  the transformer's last hidden states of the attended tokens, unnormalized (sentence-transformers'
  `output_value="token_embeddings"`).

Inputs: a plain `str` asks for what a classic embedding replica returns, the dense vector as one
np.ndarray (models with a dense output), else a dict of every output the model has (a ColBERT
text is then a document). A `MultiInput(text, outputs, query)` asks for chosen outputs and gets
a dict `{"dense": ndarray[d] | None, "sparse": (ids int32, weights float32) | None,
"tokens": ndarray[n, d] | None}`; outputs not asked for are None and are never copied off the
device (token vectors are n x d floats per text: only requests that ask for them pay for them).
The choice travels through the scheduler as one more [batch, tokens] feature (`META`), constant
along each row, that `encode_core` reads back and removes before the model sees the batch.
"""


from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from runners.models.checkpoint import linear, load_state, max_length, model_file, module_path, pooling_mode, read_json, st_modules
from runners.models.colbert import ColbertSettings, colbert_layout
from runners.vocabulary import BGE_M3_KIND, COLBERT_KIND, DENSE, MULTI_OUTPUT_KINDS, SPARSE, SPLADE_KIND, TOKENS

if TYPE_CHECKING:
    from infinity_emb.args import EngineArgs

META = "multi_output_flags"  # the per-row feature that carries what each item asks for

_BITS = {DENSE: 1, SPARSE: 2, TOKENS: 4}
_QUERY = 8  # a ColBERT query (marker + expansion); other kinds ignore it
_PLAIN = 16  # a plain str on a model with a dense output: answer the bare dense vector


class MultiInput(NamedTuple):
    """One text and what to compute for it. `outputs` empty: every output the model has."""

    text: str
    outputs: tuple[str, ...] = ()
    query: bool = False



class MultiEncoder:
    """A transformer body and the heads of its kind; see the module docstring."""

    def __init__(self, *, engine_args: EngineArgs, kind: str) -> None:
        import torch
        from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

        if kind not in MULTI_OUTPUT_KINDS:
            raise ValueError(f"unknown multi-output kind {kind!r}: one of {MULTI_OUTPUT_KINDS}")
        path = engine_args.model_name_or_path
        ls = engine_args._loading_strategy
        self.device = ls.device_placement if ls is not None else "cpu"
        dtype = ls.loading_dtype if ls is not None and ls.loading_dtype is not None else torch.float32
        kwargs = {"revision": engine_args.revision, "trust_remote_code": engine_args.trust_remote_code}
        self.kind = kind
        self.engine_args = engine_args
        self.prompts: dict[str, str] = {}
        self.colbert: ColbertSettings | None = None
        self.tokens_normalized = kind in (COLBERT_KIND, BGE_M3_KIND)
        self.dimensions: int | None = None
        self.token_dimensions: int | None = None
        self.normalize_dense = False
        self.vocab_size: int | None = None
        modules = st_modules(path)
        config_json = read_json(model_file(path, "config.json")) or {}
        sub = ""
        configured_length = None
        if kind == SPLADE_KIND:
            sub = module_path(modules, "MLMTransformer") or module_path(modules, "Transformer") or ""
        elif modules:
            sub = module_path(modules, "Transformer") or ""
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs, **({"subfolder": sub} if sub else {}))
        if kind == COLBERT_KIND:
            projection, self.colbert = colbert_layout(path, config_json, tokenizer)
        st_config = read_json(model_file(path, f"{sub}/sentence_bert_config.json" if sub else "sentence_bert_config.json"))
        if st_config:
            configured_length = st_config.get("max_seq_length")
        load = {"dtype": dtype, **kwargs, **({"subfolder": sub} if sub else {})}
        self.tokenizer = tokenizer
        if kind == SPLADE_KIND:
            self.model = AutoModelForMaskedLM.from_pretrained(path, **load).to(self.device).eval()
            pooling = read_json(model_file(path, f"{module_path(modules, 'SpladePooling')}/config.json")) \
                if module_path(modules, "SpladePooling") is not None else None
            pooling = pooling or {}
            self.splade_pooling = pooling.get("pooling_strategy", "max")
            self.splade_activation = pooling.get("activation_function", "relu")
            if self.splade_pooling not in ("max", "sum") or self.splade_activation not in ("relu", "log1p_relu"):
                raise ValueError(f"{path}: SpladePooling {pooling} is not served (max or sum; relu or log1p_relu)")
            self.outputs: tuple[str, ...] = (SPARSE,)
            self.vocab_size = int(self.model.config.vocab_size)
        else:
            try:  # BERT-like bodies: no pooler, whose weights the checkpoint may lack and no head here reads
                model = AutoModel.from_pretrained(path, add_pooling_layer=False, **load)
            except TypeError:
                model = AutoModel.from_pretrained(path, **load)
            self.model = model.to(self.device).eval()
            hidden = int(self.model.config.hidden_size)
            body_dtype = next(self.model.parameters()).dtype
            if kind == BGE_M3_KIND:
                outputs = [DENSE]
                sparse_state = load_state(path, ("sparse_linear.pt",))
                colbert_state = load_state(path, ("colbert_linear.pt",))
                self.sparse_linear = linear(sparse_state).to(self.device, body_dtype) if sparse_state else None
                self.colbert_linear = linear(colbert_state).to(self.device, body_dtype) if colbert_state else None
                if self.sparse_linear is not None:
                    outputs.append(SPARSE)
                    self.vocab_size = int(self.model.config.vocab_size)
                    self.unused_ids = frozenset(
                        tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[name])
                        for name in ("cls_token", "eos_token", "pad_token", "unk_token")
                        if name in tokenizer.special_tokens_map
                    )
                if self.colbert_linear is not None:
                    outputs.append(TOKENS)
                    self.token_dimensions = int(self.colbert_linear.out_features)
                self.outputs = tuple(outputs)
                self.pooling = "cls"
                self.dimensions = hidden
                self.normalize_dense = module_path(modules, "Normalize") is not None
            elif kind == COLBERT_KIND:
                self.projection = projection.to(self.device, body_dtype)
                self.outputs = (TOKENS,)
                self.token_dimensions = int(projection.out_features)
                if getattr(tokenizer, "padding_side", "right") != "right":
                    raise ValueError(f"{path}: ColBERT query expansion is served for right-padding tokenizers only")
            else:
                self.pooling = pooling_mode(path, modules)
                self.normalize_dense = module_path(modules, "Normalize") is not None
                self.outputs = (DENSE, TOKENS)
                self.dimensions = self.token_dimensions = hidden
                st = read_json(model_file(path, "config_sentence_transformers.json")) or {}
                self.prompts = dict(st.get("prompts") or {})
        self.max_length = max_length(tokenizer, self.model.config, configured_length)
        if self.colbert is not None:
            # The longest text a request can send: a document, less the marker inserted after CLS.
            self.max_length = self.colbert.document_length - (self.colbert.document_prefix_id is not None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.mask_id = tokenizer.mask_token_id
        if self.colbert is not None and self.colbert.expand_queries and self.mask_id is None:
            raise ValueError(f"{path}: ColBERT query expansion needs a [MASK] token, and the tokenizer has none")
        self._all_bits = sum(_BITS[o] for o in self.outputs)
        self._plain_bits = (_BITS[DENSE] | _PLAIN) if DENSE in self.outputs else self._all_bits

    # ---- the replica's three steps ----

    def _flags(self, item: Any) -> tuple[str, int]:
        if isinstance(item, str):
            return item, self._plain_bits
        text, outputs, query = MultiInput(*item)
        bits = 0
        for name in outputs or self.outputs:
            if name not in self.outputs:
                raise ValueError(f"{name!r} is not an output of this model: it gives {', '.join(self.outputs)}")
            bits |= _BITS[name]
        return text, bits | (_QUERY if query else 0)

    def encode_pre(self, items: list[Any]) -> dict[str, Any]:
        import torch

        parsed = [self._flags(item) for item in items]
        rows: list[dict[str, list[int]] | None] = [None] * len(parsed)
        for is_query in (False, True):
            chosen = [i for i, (_, bits) in enumerate(parsed) if bool(bits & _QUERY) == is_query]
            if not chosen:
                continue
            prefix = None
            length = self.max_length
            if self.colbert is not None:
                prefix = self.colbert.query_prefix_id if is_query else self.colbert.document_prefix_id
                length = (self.colbert.query_length if is_query else self.colbert.document_length) - (prefix is not None)
            encoded = self.tokenizer([parsed[i][0] for i in chosen], truncation=True, max_length=length)
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
            for j, i in enumerate(chosen):
                row = {k: list(encoded[k][j]) for k in keys}
                if prefix is not None:
                    # The marker goes right after CLS, as Stanford's and PyLate's tokenizers put it.
                    fill = {"input_ids": prefix, "attention_mask": 1, "token_type_ids": 0}
                    row = {k: v[:1] + [fill[k]] + v[1:] for k, v in row.items()}
                rows[i] = row
        width = max(len(r["input_ids"]) for r in rows)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        pads = {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0}
        out = {k: torch.full((len(rows), width), pad, dtype=torch.long) for k, pad in pads.items() if k in rows[0]}
        out[META] = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            cut = slice(width - n, width) if left else slice(0, n)
            for k, values in row.items():
                out[k][i, cut] = torch.tensor(values, dtype=torch.long)
            out[META][i] = parsed[i][1]
        return out

    def _expand_queries(self, features: dict[str, Any], queries: Any, lengths: Any) -> dict[str, Any]:
        """[MASK] tokens after each query up to the query length (the scheduler keeps rows unpadded)."""
        import torch

        length = self.colbert.query_length
        width = features["input_ids"].shape[1]
        if width < length:
            grow = length - width
            pads = {"input_ids": self.pad_id}
            features = {k: torch.cat([v, torch.full((v.shape[0], grow), pads.get(k, 0), dtype=v.dtype)], dim=1)
                        for k, v in features.items()}
            width = length
        positions = torch.arange(width)[None, :]
        zone = queries[:, None] & (positions >= lengths[:, None]) & (positions < length)
        features = {k: v.clone() for k, v in features.items()}
        features["input_ids"][zone] = self.mask_id
        features["attention_mask"][zone] = int(self.colbert.attend_to_expansion)
        if "token_type_ids" in features:
            features["token_type_ids"][zone] = 0
        return features

    def encode_core(self, features: dict[str, Any]) -> dict[str, Any]:
        """Model and heads for the batch; only what some item asks for leaves the device."""
        import torch

        features = dict(features)
        flags = (features.pop(META) * features["attention_mask"]).amax(1)
        lengths = features["attention_mask"].sum(1)
        queries = (flags & _QUERY) != 0
        if self.colbert is not None and self.colbert.expand_queries and bool(queries.any()):
            features = self._expand_queries(features, queries, lengths)
        result: dict[str, Any] = {"flags": flags.tolist()}
        want = {name: torch.tensor([bool(f & bit) for f in result["flags"]]) for name, bit in _BITS.items()}
        with torch.inference_mode():
            inputs = {k: v.to(self.device) for k, v in features.items()}
            mask = inputs["attention_mask"].bool()
            if self.kind == SPLADE_KIND:
                logits = self.model(**inputs).logits
                result[SPARSE] = self._sparse_rows(self._splade(logits, mask), want[SPARSE])
                return result
            hidden = self.model(**inputs).last_hidden_state
            if bool(want[DENSE].any()):
                dense = self._pool(hidden[want[DENSE].to(self.device)], mask[want[DENSE].to(self.device)]).float()
                if self.normalize_dense:
                    dense = torch.nn.functional.normalize(dense, dim=-1)
                result[DENSE] = (want[DENSE], dense.cpu().numpy())
            if bool(want[SPARSE].any()):
                result[SPARSE] = self._lexical_weights(hidden, inputs["input_ids"], mask, want[SPARSE])
            if bool(want[TOKENS].any()):
                result[TOKENS] = self._token_vectors(hidden, inputs["input_ids"], mask, queries, lengths, want[TOKENS])
        return result

    def encode_post(self, batch: dict[str, Any]) -> list[Any]:
        flags = batch["flags"]
        per_item: list[dict[str, Any]] = [dict.fromkeys(self.outputs) for _ in flags]
        if DENSE in batch:
            rows, vectors = batch[DENSE]
            for i, vector in zip(rows.nonzero().flatten().tolist(), vectors):
                per_item[i][DENSE] = vector
        for name in (SPARSE, TOKENS):
            for i, value in batch.get(name, {}).items():
                per_item[i][name] = value
        return [item[DENSE] if f & _PLAIN else item for f, item in zip(flags, per_item)]

    # ---- the heads ----

    def _splade(self, logits: Any, mask: Any) -> Any:
        """[batch, vocab] SPLADE weights, float32."""
        import torch

        if self.splade_pooling == "max":
            # max_t log1p(relu(x_t)) = log1p(relu(max_t x_t)): the max of each row's own tokens, read
            # once (2.7x faster on a CPU than masking the padding and reducing the whole batch), then
            # the activation on [batch, vocab] only.
            width = mask.shape[1]
            left = getattr(self.tokenizer, "padding_side", "right") == "left"
            rows = [logits[i, width - n:] if left else logits[i, :n] for i, n in enumerate(mask.sum(1).tolist())]
            weights = torch.log1p(torch.relu(torch.stack([row.amax(0) for row in rows]).float()))
            return torch.log1p(weights) if self.splade_activation == "log1p_relu" else weights
        weights = torch.log1p(torch.relu(logits.float()))
        if self.splade_activation == "log1p_relu":
            weights = torch.log1p(weights)
        return weights.mul_(mask[:, :, None]).sum(1)

    def _sparse_rows(self, weights: Any, wanted: Any) -> dict[int, tuple[Any, Any]]:
        """Non-zero (ids, weights) of the wanted rows of a [batch, vocab] matrix, found on the device."""
        import numpy as np
        import torch

        rows = wanted.nonzero().flatten().tolist()
        if not rows:
            return {}
        chosen = weights[wanted.to(weights.device)]
        nz = chosen.nonzero()
        values = chosen[nz[:, 0], nz[:, 1]].cpu().numpy().astype(np.float32, copy=False)
        ids = nz[:, 1].to(torch.int32).cpu().numpy()
        counts = torch.bincount(nz[:, 0], minlength=len(rows)).cpu().numpy()
        bounds = np.cumsum(counts)[:-1]
        return {i: (a, b) for i, a, b in zip(rows, np.split(ids, bounds), np.split(values, bounds))}

    def _lexical_weights(self, hidden: Any, input_ids: Any, mask: Any, wanted: Any) -> dict[int, tuple[Any, Any]]:
        """BGE-M3: relu(sparse_linear(h_t)) per token, max per token id, special tokens left out."""
        import numpy as np
        import torch

        rows = wanted.nonzero().flatten().tolist()
        sel = wanted.to(hidden.device)
        weights = torch.relu(self.sparse_linear(hidden[sel])).squeeze(-1).float()
        ids = input_ids[sel]
        keep = mask[sel].clone()
        for token_id in self.unused_ids:
            keep &= ids != token_id
        weights = (weights * keep).cpu().numpy()
        ids = ids.cpu().numpy()
        out = {}
        for j, i in enumerate(rows):
            positive = weights[j] > 0
            uniq, inverse = np.unique(ids[j][positive], return_inverse=True)
            best = np.zeros(len(uniq), dtype=np.float32)
            np.maximum.at(best, inverse, weights[j][positive])
            out[i] = (uniq.astype(np.int32), best)
        return out

    def _token_vectors(self, hidden: Any, input_ids: Any, mask: Any, queries: Any, lengths: Any,
                       wanted: Any) -> dict[int, Any]:
        import numpy as np
        import torch

        device = hidden.device
        if self.kind == BGE_M3_KIND:
            keep = mask.clone()
            keep[torch.arange(len(keep), device=device), mask.int().argmax(1)] = False  # not the CLS vector
        elif self.kind == COLBERT_KIND:
            docs = mask.clone()
            for token_id in self.colbert.skiplist:
                docs &= input_ids != token_id
            if self.colbert.expand_queries:
                positions = torch.arange(mask.shape[1], device=device)[None, :]
                query_rows = (positions < self.colbert.query_length).expand_as(mask)
            else:
                query_rows = mask
            keep = torch.where(queries.to(device)[:, None], query_rows, docs)
        else:
            keep = mask
        keep = keep & wanted.to(device)[:, None]
        packed = hidden[keep]
        if self.kind == BGE_M3_KIND:
            packed = torch.nn.functional.normalize(self.colbert_linear(packed).float(), dim=-1)
        elif self.kind == COLBERT_KIND:
            packed = torch.nn.functional.normalize(self.projection(packed).float(), dim=-1)
        vectors = packed.float().cpu().numpy()
        counts = keep.sum(1).cpu().numpy()
        pieces = np.split(vectors, np.cumsum(counts)[:-1])
        return {i: pieces[i] for i in wanted.nonzero().flatten().tolist()}

    def _pool(self, hidden: Any, mask: Any) -> Any:
        import torch

        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            weights = mask[:, :, None].to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.pooling == "max":
            return hidden.masked_fill(~mask[:, :, None], -1e9).amax(1)
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # the last attended position, either padding side
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
