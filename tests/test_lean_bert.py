"""The lean BERT forward (runners.models.lean_bert): the same outputs as transformers' BertModel on every
input shape the service sends, the pooler only where a head reads it, transformers' own forward for any
call it does not cover; installed by the service's loader on CPU BERT models, vectors and scores equal
to the libraries' own."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.checkpoints import WORDS, build_bert_classifier, build_bert_embedder, build_splade


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean_bert")
    return {"embedder": build_bert_embedder(root / "embedder", seed=3),
            "cross": build_bert_classifier(root / "cross", num_labels=1, seed=4),
            "splade": build_splade(root / "splade", seed=5)}


def _pair(folder, cls):
    from runners.models.lean_bert import install

    ref, lean = cls.from_pretrained(folder).eval(), cls.from_pretrained(folder).eval()
    inner = getattr(lean, "bert", lean)
    assert install(inner, pooled=inner.pooler is not None)
    return ref, lean


@pytest.mark.parametrize("texts", [["one text alone"], _texts(9), _texts(16, seed=1)], ids=["one", "nine", "sixteen"])
def test_the_hidden_states_and_pooler_equal_transformers(folders, texts):
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    tokenizer = AutoTokenizer.from_pretrained(folders["cross"])
    features = tokenizer(texts, padding=True, return_tensors="pt")
    ref, lean = _pair(folders["cross"], BertModel)
    with torch.inference_mode():
        want, got = ref(**features), lean(**features)
        assert got.last_hidden_state.shape == want.last_hidden_state.shape
        mask = features["attention_mask"].bool()  # padded positions are never read
        assert torch.allclose(got.last_hidden_state[mask], want.last_hidden_state[mask], atol=1e-5)
        assert torch.allclose(got.pooler_output, want.pooler_output, atol=1e-5)
        no_types = {k: v for k, v in features.items() if k != "token_type_ids"}
        assert torch.allclose(lean(**no_types).last_hidden_state[mask], want.last_hidden_state[mask], atol=1e-5)
        as_tuple = lean(**features, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0][mask], want.last_hidden_state[mask], atol=1e-5)
    head_ref, head_lean = _pair(folders["cross"], BertForSequenceClassification)
    with torch.inference_mode():  # the classification head reads the pooler
        assert torch.allclose(head_lean(**features).logits, head_ref(**features).logits, atol=1e-5)


def test_calls_it_does_not_cover_go_to_transformers_own_forward(folders):
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(folders["cross"])
    features = tokenizer(_texts(3), padding=True, return_tensors="pt")
    _, lean = _pair(folders["cross"], BertModel)
    with torch.inference_mode():
        assert lean(**features, output_hidden_states=True).hidden_states is not None
        embeds = lean.embeddings.word_embeddings(features["input_ids"])
        assert lean(inputs_embeds=embeds, attention_mask=features["attention_mask"]).last_hidden_state.shape[1] == embeds.shape[1]
    out = lean(**features)  # gradients on: transformers' own forward, which autograd can follow
    assert out.last_hidden_state.requires_grad
    lean.train()
    with torch.inference_mode():
        assert lean(**features).last_hidden_state is not None


def test_only_cpu_bert_encoders_take_it(folders):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    from runners.models.lean_bert import eligible, install

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 99}
    assert eligible(BertModel(BertConfig(**small)))
    assert not eligible(RobertaModel(RobertaConfig(**small)))
    assert not eligible(BertModel(BertConfig(**small, is_decoder=True)))
    twice = BertModel(BertConfig(**small))
    assert install(twice, pooled=False) and not install(twice, pooled=False)

    class OwnCode(BertModel):  # a model's own modeling file: its forward may do anything
        pass

    assert not eligible(OwnCode(BertConfig(**small)))
    swapped = BertModel(BertConfig(**small))
    swapped.encoder.layer[0].attention.self.query = type("Adapter", (torch.nn.Linear,), {})(32, 32)
    assert not eligible(swapped)


def _outputs(scheduler, inputs) -> list:
    replica = scheduler.replica
    with torch.inference_mode():
        return list(replica.encode_post(replica.encode_core(replica.encode_pre(inputs))))


def _close(got, want) -> bool:
    """The same structure (dicts of outputs, tuples of ids and weights, rows), numbers within 1e-4."""
    if isinstance(got, dict):
        return got.keys() == want.keys() and all(_close(got[k], want[k]) for k in got)
    if isinstance(got, (list, tuple)) and not np.isscalar(got):
        return len(got) == len(want) and all(_close(a, b) for a, b in zip(got, want))
    a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return a.shape == b.shape and np.allclose(a, b, atol=1e-4)


def test_the_loader_installs_it_and_every_output_equals_transformers_own_forward(folders):
    """Through the service's own loader (runners.engine.loaded.load_model): an ST embedder (its pooler
    skipped), a cross-encoder (its pooler kept) and SPLADE (none) take the lean forward; each model's
    outputs on mixed lengths equal those with it taken out again, and the embedder's equal the library's."""
    from sentence_transformers import SentenceTransformer

    from runners.engine.devices import torch_module
    from runners.engine.loaded import load_model
    from runners.settings import load_settings

    texts = _texts(24, seed=7)
    settings = load_settings({"MODEL_NAMES": f"{folders['embedder']};{folders['cross']};{folders['splade']}",
                              "SERVED_MODEL_NAMES": "e;c;s", "DEVICE": "cpu"})
    inputs = {"e": texts, "c": [(texts[0], t) for t in texts], "s": texts}
    pooled = {"e": False, "c": True, "s": False}
    for spec in settings.models:
        scheduler = load_model(spec, settings).scheduler
        lean = [m for m in torch_module(scheduler.replica).modules() if getattr(m, "_lean_forward", False)]
        assert len(lean) == 1, spec.served_name
        uses_pooler = lean[0]._lean_pooled
        got = _outputs(scheduler, inputs[spec.served_name])
        del lean[0].forward  # transformers' own forward again
        want = _outputs(scheduler, inputs[spec.served_name])
        assert _close(got, want), spec.served_name
        assert uses_pooler == pooled[spec.served_name], spec.served_name
        if spec.served_name == "e":
            library = SentenceTransformer(str(folders["embedder"]), device="cpu").encode(texts)
            unit = np.stack(got) / np.linalg.norm(np.stack(got), axis=1, keepdims=True)
            assert (unit * library).sum(axis=1).min() >= 0.99999
