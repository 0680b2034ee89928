"""Token-level items for an ordinary embedding replica, sent one by one through the scheduler like any
text (runners.engine.scheduler batches them with everything else):

- `TokenRequest(ids=...)`: token ids that already carry the model's special tokens (and prompt), read
  as they are instead of tokenizing a text; answered with the pooled vector, exactly as for a text
  that tokenizes to those ids (chunking's windows, runners.capabilities.long_inputs).
- `TokenRequest(text=..., tokens=True)`: a text, tokenized (and truncated) as any text, answered with
  its last-layer token vectors, special tokens included (TEI's `/embed_all`, `output: tokens`).
- `TokenRequest(ids=..., labels=(one int per id))`: answered with the sums of the last-layer token
  vectors per label, `sums[k - 1]` for label k; 0 leaves a position out (late chunking, which needs
  only each piece's sum: a long document's token vectors never pile up).

Items with `tokens` or `labels` are answered with a `TokenOutput(pooled, sums)`; a plain `str` or an
unlabelled item with the bare pooled vector, as before. The labels travel through the scheduler as one
more [batch, tokens] feature (`LABELS`, 0 when unlabelled), which `encode_core` removes before the model
sees the batch; a batch in which no item has labels runs exactly the replica's own code.

`with_token_inputs(replica)` gives Infinity's sentence-transformers replica, or this project's ONNX
replica, these items: the object's class becomes a subclass with the `TokenInputs` mixin, so the
object, its weights and whatever inspects it (thread settings, normalization) stay as they are.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

LABELS = "token_labels"  # the per-position feature: which sum a position adds to (0: none)
_FILL = {"input_ids": None, "attention_mask": 1, "token_type_ids": 0}  # a feature's value at a real id (None: the id)


class TokenRequest(NamedTuple):
    """One item for a replica with token inputs: a `text`, or `ids` with the special tokens in them."""

    text: str | None = None
    ids: tuple[int, ...] | None = None
    tokens: bool = False  # answer every position's vector (labels 1..n)
    labels: tuple[int, ...] | None = None  # with ids: one label per id; sums per label


class TokenOutput(NamedTuple):
    pooled: np.ndarray  # [d]: the model's vector for the item (its pooling, unnormalized)
    sums: np.ndarray  # [max label, hidden]: per label, the sum of its positions' last-layer vectors


class _Layout:
    """The replica's features as its `encode_pre` makes them: keys, tensor kind, padding side, pad id."""

    def __init__(self, replica: Any, tokenizer: Any) -> None:
        features = replica.encode_pre(["a", "a b c d"])
        # Bookkeeping that is no tensor (sentence-transformers 5+: `modality`, "text" by default) is left out.
        self.keys = [k for k in features if k != LABELS and hasattr(features[k], "shape")]
        unknown = [k for k in self.keys if k not in _FILL]
        if unknown or "input_ids" not in self.keys or "attention_mask" not in self.keys:
            raise TypeError(f"{type(replica).__name__}.encode_pre gives features {self.keys}: token inputs need "
                            "input_ids and attention_mask (and token_type_ids) only")
        mask = features["attention_mask"]
        self.is_torch = type(mask).__module__.startswith("torch")
        self.dtypes = {k: features[k].dtype for k in self.keys}
        self.pad_left = getattr(tokenizer, "padding_side", "right") == "left"
        self.pads = {"input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                     "attention_mask": 0, "token_type_ids": 0, LABELS: 0}

    def rows(self, features: Any) -> list[dict[str, list[int]]]:
        """Each row of a padded batch, without its padding, as lists."""
        mask = features["attention_mask"]
        width = int(mask.shape[1])
        out = []
        for i, n in enumerate(int(x) for x in mask.sum(1).tolist()):
            cut = slice(width - n, width) if self.pad_left else slice(0, n)
            out.append({k: features[k][i, cut].tolist() for k in self.keys})
        return out

    def row_of(self, ids: tuple[int, ...]) -> dict[str, list[int]]:
        n = len(ids)
        return {k: list(ids) if _FILL[k] is None else [_FILL[k]] * n for k in self.keys}

    def batch(self, rows: list[dict[str, list[int]]], labels: list[list[int]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        out = {}
        for key in [*self.keys, LABELS]:
            arr = np.full((len(rows), width), self.pads[key], dtype=np.int64)
            for i, row in enumerate(rows):
                values = labels[i] if key == LABELS else row[key]
                if values:
                    if self.pad_left:
                        arr[i, width - len(values):] = values
                    else:
                        arr[i, :len(values)] = values
            out[key] = arr
        if self.is_torch:
            import torch

            return {k: torch.from_numpy(v).to(self.dtypes.get(k, torch.int64)) for k, v in out.items()}
        return {k: v.astype(self.dtypes.get(k, np.int64), copy=False) for k, v in out.items()}

    def zeros_like(self, mask: Any) -> Any:
        if self.is_torch:
            import torch

            return torch.zeros_like(mask, dtype=torch.int64)
        return np.zeros(mask.shape, dtype=np.int64)


class TokenInputs:
    """The mixin: `TokenRequest` items beside plain texts (see the module docstring). A subclass gives
    `_states(features) -> (core, hidden)`: the replica's own `encode_core` result and the last hidden
    states [batch, tokens, hidden] of the same forward pass."""

    _token_layout: _Layout

    def encode_pre(self, items: list[Any]) -> dict[str, Any]:
        layout = self._token_layout
        if all(isinstance(x, str) for x in items):
            features = super().encode_pre(items)  # type: ignore[misc]
            features[LABELS] = layout.zeros_like(features["attention_mask"])
            return features
        texts = [x if isinstance(x, str) else x.text for x in items if isinstance(x, str) or x.ids is None]
        text_rows = iter(layout.rows(super().encode_pre(texts))) if texts else iter(())  # type: ignore[misc]
        rows, labels = [], []
        for x in items:
            if isinstance(x, str) or x.ids is None:
                row = next(text_rows)
            elif not x.ids:
                raise ValueError("a TokenRequest has no ids")
            else:
                row = layout.row_of(x.ids)
            n = len(row["input_ids"])
            if isinstance(x, str):
                label = [0] * n
            elif x.labels is not None:
                if len(x.labels) != n:
                    raise ValueError(f"a TokenRequest has {len(x.labels)} labels for {n} ids")
                label = list(x.labels)
            else:
                label = list(range(1, n + 1)) if x.tokens else [0] * n
            rows.append(row)
            labels.append(label)
        return layout.batch(rows, labels)

    def encode_core(self, features: dict[str, Any]) -> Any:
        features = dict(features)
        labels = features.pop(LABELS)
        rows = (labels > 0).any(1)
        wanted = [int(i) for i in (rows.nonzero().flatten() if self._token_layout.is_torch else np.flatnonzero(rows))]
        if not wanted:
            return super().encode_core(features), None  # type: ignore[misc]
        core, hidden = self._states(features)
        return core, {i: _label_sums(hidden[i], labels[i]) for i in wanted}

    def encode_post(self, out: Any) -> Any:
        core, sums = out
        pooled = super().encode_post(core)  # type: ignore[misc]
        if not sums:
            return pooled
        rows = list(pooled)
        for i, s in sums.items():
            rows[i] = TokenOutput(np.asarray(rows[i], dtype=np.float32), s)
        return rows

    def _states(self, features: dict[str, Any]) -> tuple[Any, Any]:
        raise NotImplementedError


def _label_sums(hidden: Any, labels: Any) -> np.ndarray:
    """[max label, hidden] float32: per label k, the sum of the rows of `hidden` labelled k."""
    if isinstance(hidden, np.ndarray):
        labels = np.asarray(labels)
        keep = labels > 0
        out = np.zeros((int(labels.max()), hidden.shape[-1]), dtype=np.float32)
        np.add.at(out, labels[keep] - 1, hidden[keep].astype(np.float32))
        return out
    import torch

    labels = labels.to(hidden.device)
    keep = labels > 0
    out = torch.zeros((int(labels.max()), hidden.shape[-1]), dtype=torch.float32, device=hidden.device)
    out.index_add_(0, labels[keep] - 1, hidden[keep].float())
    return out.cpu().numpy()


class SentenceTransformerTokenInputs(TokenInputs):
    """Infinity's SentenceTransformerPatched: its forward gives `token_embeddings` beside the pooled vector."""

    def _states(self, features: dict[str, Any]) -> tuple[Any, Any]:
        import torch
        from sentence_transformers import util

        with torch.no_grad():
            out = self.forward(util.batch_to_device(features, self.device))  # type: ignore[attr-defined]
            return out["sentence_embedding"].detach().cpu(), out["token_embeddings"]


class OnnxTokenInputs(TokenInputs):
    """runners.models.onnx.OnnxEmbedder: its `encode_core` already returns the hidden states."""

    def _states(self, features: dict[str, Any]) -> tuple[Any, Any]:
        core = super(TokenInputs, self).encode_core(features)  # type: ignore[misc]  # the replica's own
        return core, core[0]


_CLASSES: dict[tuple[type, type], type] = {}


def with_token_inputs(replica: Any) -> bool:
    """Give the replica `TokenRequest` items when its kind is known here; False when it is not."""
    if isinstance(replica, TokenInputs):
        return True
    mixin = _mixin_for(replica)
    if mixin is None:
        return False
    tokenizer = getattr(replica, "tokenizer", None)
    try:
        layout = _Layout(replica, tokenizer)
    except TypeError:
        return False
    base = type(replica)
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        cls = _CLASSES[(mixin, base)] = type(f"{base.__name__}WithTokenInputs", (mixin, base), {})
    replica._token_layout = layout
    replica.__class__ = cls
    return True


def _mixin_for(replica: Any) -> type | None:
    from runners.models.onnx import OnnxEmbedder

    if isinstance(replica, OnnxEmbedder):
        return OnnxTokenInputs
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    if isinstance(replica, SentenceTransformer) and not getattr(replica, "mode_colbert", False) \
            and hasattr(replica, "encode_core"):
        return SentenceTransformerTokenInputs
    return None


def token_pooling(replica: Any) -> str | None:
    """How the replica's vector comes from its token vectors, when it is nothing more than that pooling
    (then a mean over some tokens is a vector of the same space: late chunking): "mean", "cls", "max",
    "lasttoken"; None when something else follows the pooling (a Dense layer) or it is unknown."""
    from runners.models.onnx import OnnxEmbedder

    if isinstance(replica, OnnxEmbedder):
        return {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max", "lasttoken": "lasttoken"}.get(
            replica.pooling)
    modules = list(replica) if hasattr(replica, "__getitem__") and hasattr(replica, "__len__") else []
    if not modules or type(modules[-1]).__name__ != "Pooling":
        return None  # a Dense (or anything) after the pooling, or not a sentence-transformers model
    pooling = modules[-1]
    if getattr(pooling, "include_prompt", True) is False:
        return None
    if hasattr(pooling, "get_pooling_mode_str"):  # sentence-transformers < 5.4
        mode = pooling.get_pooling_mode_str()
    else:  # one mode name, or a tuple of them (concatenated poolings: not a pooling of token vectors)
        mode = pooling.pooling_mode if isinstance(pooling.pooling_mode, str) else None
    return mode if mode in ("mean", "cls", "max", "lasttoken") else None
