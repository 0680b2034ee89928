"""Unpadded rows and batches: what the scheduler keeps per tokenized item, and how it pads chosen
items back into exactly the batch the replica's `encode_pre` would have made."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class FeatureCodec:
    """Splits what `encode_pre` returns into unpadded rows and pads chosen rows back into a batch.

    Learned from the replica itself with a probe of two inputs of different lengths: which side it
    pads, and the pad value of every feature (input_ids, attention_mask, token_type_ids, ...). The
    re-padded batch is exactly what `encode_pre` would return for those inputs together.
    """

    def __init__(self, replica: Any, probe: Sequence[Any]) -> None:
        features = replica.encode_pre(list(probe))
        if "attention_mask" not in features:
            raise TypeError(f"{type(replica).__name__}.encode_pre returns no attention_mask: it cannot be batched here")
        mask = features["attention_mask"]
        self.is_torch = type(mask).__module__.startswith("torch")
        lengths = [int(n) for n in mask.sum(1).tolist()]
        width = int(mask.shape[1])
        short = lengths.index(min(lengths))
        if min(lengths) == width:
            raise ValueError(f"{type(replica).__name__}: the probe inputs tokenized to the same length")
        self.pad_left = int(mask[short][0]) == 0
        pad_at = 0 if self.pad_left else width - 1
        self.pad_values: dict[str, Any] = {}
        self.dtypes: dict[str, Any] = {}
        # Bookkeeping that is one value for the whole batch (sentence-transformers 5+: `modality`,
        # "text" for texts): carried into every collated batch as it came.
        self.constants: dict[str, Any] = {}
        for key, value in features.items():
            if isinstance(value, (str, int, float, bool)) or value is None:
                self.constants[key] = value
                continue
            if getattr(value, "ndim", None) != 2 or tuple(value.shape) != (len(lengths), width):
                raise TypeError(f"{type(replica).__name__}.encode_pre gives {key!r} of shape "
                                f"{getattr(value, 'shape', '?')}: only [batch, tokens] features can be batched here")
            self.pad_values[key] = value[short][pad_at].item()
            self.dtypes[key] = value.dtype

    def split(self, features: Any) -> list[tuple[dict[str, Any], int]]:
        """One (features, length) per row, without the padding."""
        mask = features["attention_mask"]
        width = int(mask.shape[1])
        keys = list(self.pad_values)
        rows = []
        for i, n in enumerate(int(x) for x in mask.sum(1).tolist()):
            cut = slice(width - n, width) if self.pad_left else slice(0, n)
            rows.append(({k: features[k][i, cut] for k in keys}, n))
        return rows

    def collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {**self._collate(rows), **self.constants}

    def _collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(rows) == 1:
            return {k: v[None] for k, v in rows[0].items()}
        if self.is_torch:
            from torch.nn.utils.rnn import pad_sequence

            side = "left" if self.pad_left else "right"
            return {k: pad_sequence([r[k] for r in rows], batch_first=True, padding_value=pad, padding_side=side)
                    for k, pad in self.pad_values.items()}
        import numpy as np

        width = max(len(r["attention_mask"]) for r in rows)
        out = {}
        for k, pad in self.pad_values.items():
            arr = np.full((len(rows), width), pad, dtype=self.dtypes[k])
            for i, r in enumerate(rows):
                n = len(r[k])
                if self.pad_left:
                    arr[i, width - n:] = r[k]
                else:
                    arr[i, :n] = r[k]
            out[k] = arr
        return out
