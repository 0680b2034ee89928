"""Quantized embedding outputs: `float`, `int8`, `uint8`, `binary` and `ubinary`.

The types mean what sentence-transformers' `quantize_embeddings` and Cohere's `embedding_types` mean. Let
`v` be one request vector after the request's own transformation (first `dimensions` values kept, then the
row L2-normalized when `normalize` is true or `dimensions` is given), with `D` values:

* `float`:   `v` as float32.
* `ubinary`: `numpy.packbits(v > 0, axis=-1)`: one bit per dimension, big-endian within each byte (dimension
  0 is the most significant bit of byte 0), `ceil(D / 8)` bytes; when `D` is not a multiple of 8 the last byte
  is zero-padded on the right. uint8. Compare with Hamming distance.
* `binary`:  `ubinary - 128` as int8 (the same bits, offset into the signed range), as sentence-transformers
  and Cohere define it.
* `uint8`:   per dimension `j`, with a calibration range `[lo_j, hi_j]`:
  `u_j = clip(round((v_j - lo_j) / (hi_j - lo_j) * 255), 0, 255)`. uint8, `D` values.
  Where `hi_j - lo_j` is not positive (a dimension that never varied in calibration) the result is 0.
* `int8`:    `u_j - 128`: the same 256 levels over the full signed range, `lo_j -> -128`, `hi_j -> 127`.

This follows sentence-transformers' formula (`starts = lo`, `steps = (hi - lo) / 255`, `(v - starts) / steps`,
and `- 128` for int8) with two deliberate differences: values are rounded to the nearest level instead of
truncated by `astype`, and clipped to the range first, so a value outside the calibration range saturates at
0/255 (-128/127) instead of wrapping around. sentence-transformers also packs bits over the flattened matrix;
here bits are packed per row (`axis=-1`), which is the same whenever `D` is a multiple of 8.

The ranges come from a calibration set: the server embeds `runners.calibration_corpus.CALIBRATION_TEXTS`
once per model (raw, full-width, un-normalized vectors) and `Calibration.ranges(dimensions, normalize)` applies
the request's transformation to that matrix before taking per-dimension ranges, so a request for 128
normalized dimensions is quantized with ranges of 128-dimension normalized vectors. The ranges are the
`CLIP_PERCENTILE`-th and `100 - CLIP_PERCENTILE`-th percentiles per dimension (see `CLIP_PERCENTILE`).
"""

from __future__ import annotations

import base64
import threading

import numpy as np

from runners.vocabulary import EMBEDDING_TYPES

# Per-dimension range = [p, 100 - p] percentiles of the calibration embeddings. Chosen by measurement on
# all-MiniLM-L6-v2: calibrate on a random half (128) of CALIBRATION_TEXTS, then rank the other 128 texts plus the
# 50 query/document texts of tests/test_quantize.py against each other (leave-one-out, int8 dot product vs float
# cosine), mean over 10 random splits -- top-1 agreement / mean top-5 overlap / correlation of all pair scores:
#   full width:      p=0 (min/max) 0.876/0.841/0.936   p=0.5 0.886/0.853/0.948   p=1 0.893/0.856/0.951
#                    p=2.5 0.892/0.854/0.955   p=5 0.877/0.849/0.953
#   dimensions=128:  p=0 0.746/0.752/0.918   p=0.5 0.767/0.772/0.934   p=1 0.777/0.771/0.937   p=2.5 0.784/0.774/0.941
#   dimensions=64:   p=0 0.689/0.727/0.919   p=0.5 0.708/0.749/0.933   p=1 0.706/0.749/0.934   p=2.5 0.704/0.743/0.939
# min/max was the worst everywhere: with a few hundred texts each dimension's extreme is set by one outlier text,
# which stretches the range and wastes levels on values that almost never occur. p=1 to p=2.5 are within noise
# of each other; p=1 (about 2-3 of the 256 texts saturate per side and dimension) is the milder choice.
CLIP_PERCENTILE = 1.0


def prepare(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """The request transformation: keep the first `dimensions` values, then L2-normalize rows when
    `normalize` is true or `dimensions` is given. float32 out; the input is not modified."""
    out = np.asarray(vectors, dtype=np.float32)
    if dimensions is not None:
        out = out[:, :dimensions]
    if normalize or dimensions is not None:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


class Calibration:
    """Per-dimension quantization ranges learned from a matrix of calibration embeddings.

    `embeddings` are the model's raw outputs for the calibration texts: float, shape (n, full_dims),
    un-normalized and untruncated. `ranges()` derives (and caches) the ranges for each request shape.
    """

    def __init__(self, embeddings: np.ndarray, clip_percentile: float = CLIP_PERCENTILE) -> None:
        matrix = np.asarray(embeddings, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] < 2 or matrix.shape[1] < 1:
            raise ValueError(f"calibration embeddings must be a 2-D matrix with at least 2 rows, got shape {matrix.shape}")
        if not 0.0 <= clip_percentile < 50.0:
            raise ValueError(f"clip_percentile must be in [0, 50), got {clip_percentile}")
        self.embeddings = matrix
        self.clip_percentile = float(clip_percentile)
        self._cache: dict[tuple[int | None, bool], tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    @property
    def dims(self) -> int:
        return int(self.embeddings.shape[1])

    def ranges(self, dimensions: int | None, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), float32 arrays of length `dimensions` (or the full width), for vectors produced with this
        `dimensions` / `normalize`. Read-only arrays, cached per (dimensions, effective normalize)."""
        if dimensions is not None and not 1 <= dimensions <= self.dims:
            raise ValueError(f"dimensions={dimensions} is outside 1..{self.dims} of the calibration embeddings")
        normalize = bool(normalize or dimensions is not None)
        if dimensions == self.dims:
            dimensions = None  # keeping every dimension is no truncation (normalize is already forced on)
        key = (dimensions, normalize)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        matrix = prepare(self.embeddings, dimensions, normalize)
        p = self.clip_percentile
        if p > 0:
            lo, hi = np.percentile(matrix, [p, 100.0 - p], axis=0)
        else:
            lo, hi = matrix.min(axis=0), matrix.max(axis=0)
        lo, hi = lo.astype(np.float32), hi.astype(np.float32)
        lo.flags.writeable = False
        hi.flags.writeable = False
        with self._lock:
            return self._cache.setdefault(key, (lo, hi))


def _levels(vectors: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """clip(round((v - lo) / (hi - lo) * 255), 0, 255) as uint8; 0 where hi <= lo."""
    width = hi - lo
    scale = np.where(width > 0, 255.0 / np.where(width > 0, width, 1.0), 0.0).astype(np.float32)
    scaled = (vectors - lo) * scale
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def quantize(
    vectors: np.ndarray,
    embedding_type: str,
    calibration: Calibration | None,
    *,
    dimensions: int | None,
    normalize: bool,
) -> np.ndarray:
    """Quantize a (n, D) matrix of request vectors, already truncated/normalized as the request asked.

    `dimensions` / `normalize` are the request's values; they select the calibration ranges for int8/uint8
    (which need `calibration`). dtypes: float -> float32 (n, D); int8 -> int8 (n, D); uint8 -> uint8 (n, D);
    binary -> int8 (n, ceil(D/8)); ubinary -> uint8 (n, ceil(D/8)). ValueError for an unknown type.
    """
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"unknown embedding type {embedding_type!r}; expected one of {', '.join(EMBEDDING_TYPES)}")
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ValueError(f"vectors must be a 2-D matrix, got shape {arr.shape}")
    if embedding_type == "float":
        return arr.astype(np.float32, copy=False)
    if embedding_type == "ubinary":
        return np.packbits(arr > 0, axis=-1)
    if embedding_type == "binary":
        return (np.packbits(arr > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    if calibration is None:
        raise ValueError(f"embedding type {embedding_type!r} needs a calibration")
    lo, hi = calibration.ranges(dimensions, normalize)
    if arr.shape[1] != lo.shape[0]:
        raise ValueError(
            f"vectors have {arr.shape[1]} dimensions but the calibration ranges for dimensions={dimensions} have {lo.shape[0]}"
        )
    levels = _levels(arr.astype(np.float32, copy=False), lo, hi)
    if embedding_type == "uint8":
        return levels
    return (levels.astype(np.int16) - 128).astype(np.int8)


def to_json(arr: np.ndarray) -> list:
    """Rows as lists of plain Python ints (integer types) or floats (float32)."""
    return arr.tolist()


def to_base64(arr: np.ndarray) -> list[str]:
    """One base64 string per row of the raw little-endian bytes: float32 LE for floats, the bytes themselves
    for int8/uint8 (signed bytes keep their two's-complement encoding)."""
    if arr.dtype.kind == "f":
        arr = arr.astype("<f4", copy=False)
    rows = np.ascontiguousarray(arr)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
