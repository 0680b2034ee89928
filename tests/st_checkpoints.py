"""Tiny random checkpoints in every sentence-transformers format, saved by the pinned library itself
(`save`), plus the pre-5.4 layout (old module paths, boolean pooling keys) written from a new one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import checkpoints

# The class paths releases before 5.4 wrote into modules.json.
LEGACY_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Normalize": "sentence_transformers.models.Normalize",
    "Dense": "sentence_transformers.models.Dense",
    "StaticEmbedding": "sentence_transformers.models.StaticEmbedding",
}


def widen_keeping_norms(model, std: float):
    """Redraw every weight but the norms' from N(0, std): the default init maps every text to nearly one
    vector, and so does a widened LayerNorm (its random bias swamps the rest: cosine 0.9999 between any
    two texts of the tiny BERT, which would make every comparison with the library pass)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name.lower():
                p.normal_(0, std)
    return model


def _bert_body(folder: Path, seed: int, head: str = "model", num_labels: int = 1) -> Path:
    import torch
    from transformers import BertForMaskedLM, BertForSequenceClassification, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(checkpoints._bert_vocab(folder)), do_lower_case=True, model_max_length=128)
    torch.manual_seed(seed)
    config = checkpoints._bert_config(tokenizer.vocab_size, num_labels=num_labels)
    model_class = {"model": BertModel, "mlm": BertForMaskedLM, "seq-cls": BertForSequenceClassification}[head]
    config.architectures = [model_class.__name__]
    widen_keeping_norms(model_class(config).eval(), 0.3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_dense(folder: Path, seed: int = 0, *, prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                truncate_dim: int | None = None, similarity_fn_name: str | None = None, pooling: str = "mean") -> Path:
    """A SentenceTransformer (Transformer, Pooling, Normalize) as sentence-transformers saves it now."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    base = _bert_body(folder.parent / (folder.name + "-base"), seed)
    st = SentenceTransformer(modules=[Transformer(str(base), max_seq_length=128), Pooling(32, pooling_mode=pooling),
                                      Normalize()], device="cpu", prompts=prompts, default_prompt_name=default_prompt_name,
                             truncate_dim=truncate_dim, similarity_fn_name=similarity_fn_name)
    st.save(str(folder))
    return folder


def to_legacy(folder: Path, target: Path) -> Path:
    """The same model in the layout of sentence-transformers < 5.4: old class paths, boolean pooling keys."""
    shutil.copytree(folder, target)
    modules = json.loads((target / "modules.json").read_text())
    for module in modules:
        name = module["type"].rsplit(".", 1)[-1]
        module["type"] = LEGACY_TYPES[name]
        if name == "Pooling":
            path = target / module["path"] / "config.json"
            config = json.loads(path.read_text())
            mode = config.pop("pooling_mode")
            config = {"word_embedding_dimension": config.pop("embedding_dimension"), **{
                f"pooling_mode_{m}": mode == short for m, short in (
                    ("cls_token", "cls"), ("mean_tokens", "mean"), ("max_tokens", "max"),
                    ("mean_sqrt_len_tokens", "mean_sqrt_len_tokens"), ("weightedmean_tokens", "weightedmean"),
                    ("lasttoken", "lasttoken"))}, **config}
            path.write_text(json.dumps(config))
    (target / "modules.json").write_text(json.dumps(modules))
    st_config = target / "config_sentence_transformers.json"
    config = json.loads(st_config.read_text())
    config.pop("model_type", None)
    config["__version__"] = {"sentence_transformers": "3.4.1"}
    st_config.write_text(json.dumps(config))
    return target


def build_static(folder: Path, seed: int = 0, dim: int = 24, *, truncate_dim: int | None = None) -> Path:
    """A StaticEmbedding model (model2vec's layout): modules.json, model.safetensors, tokenizer.json, no config.json."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, StaticEmbedding
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[UNK]", "[PAD]", *checkpoints.WORDS]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    torch.manual_seed(seed)
    static = StaticEmbedding(tok, embedding_weights=torch.randn(len(vocab), dim))
    SentenceTransformer(modules=[static, Normalize()], device="cpu", truncate_dim=truncate_dim).save(str(folder))
    return folder


def build_cross_encoder(folder: Path, seed: int = 0) -> Path:
    """A CrossEncoder as sentence-transformers 5.4+ saves it (modules.json, model_type CrossEncoder)."""
    from sentence_transformers import CrossEncoder

    base = _bert_body(folder.parent / (folder.name + "-base"), seed, head="seq-cls", num_labels=1)
    CrossEncoder(str(base), num_labels=1, device="cpu").save(str(folder))
    return folder


def build_sparse_encoder(folder: Path, seed: int = 0) -> Path:
    """A SparseEncoder (MLMTransformer + SpladePooling) as sentence-transformers saves it."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    base = _bert_body(folder.parent / (folder.name + "-base"), seed, head="mlm")
    SparseEncoder(modules=[Transformer(str(base), transformer_task="fill-mask", max_seq_length=128), SpladePooling("max")],
                  device="cpu").save(str(folder))
    return folder


def build_unknown_module(folder: Path) -> Path:
    """A dense model whose modules.json names a module class nobody ships."""
    build_dense(folder, seed=3)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2_Mystery", "path": "2_Mystery", "type": "my_package.layers.MysteryLayer"})
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


# ---- LLM rerankers in the library's form: a causal LM and LogitScore (sentence-transformers 5.4+) ----

# Templates written for these tests in the shapes the published models use: Qwen3-Reranker's (the
# instruction from a system message inside the user turn, yes/no) and an mxbai-rerank-v2-like one (the
# instruction after the document, "1"/"0"). A pair reaches a template as a query and a document message.
QWEN3_STYLE_TEMPLATE = (
    "{%- set ns = namespace(instruct='Given a web search query, retrieve relevant passages that answer the query') -%}"
    "{%- for m in messages if m.role == 'system' %}{% set ns.instruct = m.content %}{% endfor -%}"
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: {{ ns.instruct }}\n<Query>: {{ (messages | selectattr('role', 'eq', 'query') | first).content }}\n"
    "<Document>: {{ (messages | selectattr('role', 'eq', 'document') | first).content }}<|im_end|>\n"
    # An expression, not text: Jinja drops a template's last newline.
    "<|im_start|>assistant\n<think>\n\n</think>{{ '\\n\\n' }}"
)
MXBAI_STYLE_TEMPLATE = (
    "{%- set ns = namespace(task='') -%}"
    "{%- for m in messages if m.role == 'system' %}{% set ns.task = m.content %}{% endfor -%}"
    "<|im_start|>system\nYou rate search relevance.<|im_end|>\n<|im_start|>user\n"
    "query: {{ (messages | selectattr('role', 'eq', 'query') | first).content }}\n"
    "document: {{ (messages | selectattr('role', 'eq', 'document') | first).content }}\n"
    "{{ ns.task }}\nRelevance:<|im_end|>\n<|im_start|>assistant\n"
)


def build_llm_reranker(folder: Path, style: str = "qwen3", seed: int = 0, max_seq_length: int | None = None) -> Path:
    """A tiny Qwen3 causal LM saved by `CrossEncoder.save` as an LLM reranker. `qwen3`: the library's
    default for a causal LM (yes/no, sigmoid) with a Qwen3-Reranker-like chat template; `mxbai`: tokens
    "1"/"0", its own template and a default prompt; `plain`: no chat template (the tokenizer's pair
    encoding), the "yes" logit alone and no activation (zerank's single-token form). `max_seq_length`:
    a window short enough to truncate."""
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder.modules import LogitScore
    from transformers import AutoTokenizer

    base = checkpoints.build_qwen3_reranker(folder.parent / (folder.name + "-base"), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if style != "plain":
        tokenizer.chat_template = QWEN3_STYLE_TEMPLATE if style == "qwen3" else MXBAI_STYLE_TEMPLATE
        tokenizer.save_pretrained(base)
    if style == "qwen3":
        model = CrossEncoder(str(base), device="cpu")
    elif style == "mxbai":
        true_id, false_id = tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("0")
        model = CrossEncoder(modules=[Transformer(str(base), transformer_task="text-generation"),
                                      LogitScore(true_token_id=true_id, false_token_id=false_id)], device="cpu",
                             prompts={"relevance": "Answer 1 if the document answers the query, else 0."},
                             default_prompt_name="relevance")
    else:
        model = CrossEncoder(modules=[Transformer(str(base), transformer_task="text-generation"),
                                      LogitScore(true_token_id=tokenizer.convert_tokens_to_ids("yes"))], device="cpu",
                             activation_fn=torch.nn.Identity())
    if max_seq_length:
        model.max_seq_length = max_seq_length
    model.save(str(folder))
    return folder


# ---- routed models: sentence-transformers' Router, a route per task ----


def build_routed_dense(folder: Path, seed: int = 0) -> Path:
    """A SentenceTransformer whose Router sends queries to a StaticEmbedding (a lookup, no model pass) and
    documents to a BERT with mean pooling, both 32 wide, then Normalize; the default route is "document"."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Router, Transformer
    from sentence_transformers.models import Normalize, Pooling, StaticEmbedding
    from transformers import AutoTokenizer

    base = _bert_body(folder.parent / (folder.name + "-base"), seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed + 1)
    static = StaticEmbedding(tokenizer, embedding_weights=torch.randn(tokenizer.vocab_size, 32))
    router = Router.for_query_document(query_modules=[static],
                                       document_modules=[Transformer(str(base), max_seq_length=128), Pooling(32)])
    SentenceTransformer(modules=[router, Normalize()], device="cpu").save(str(folder))
    return folder


def build_routed_sparse(folder: Path, seed: int = 0) -> Path:
    """An inference-free SparseEncoder: queries through SparseStaticEmbedding (an idf weight per token, no
    model pass), documents through a BERT MLM with SpladePooling; the default route is "document"."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Router, Transformer
    from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding, SpladePooling
    from transformers import AutoTokenizer

    base = _bert_body(folder.parent / (folder.name + "-base"), seed, head="mlm")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed + 1)
    idf = SparseStaticEmbedding(tokenizer, weight=torch.rand(tokenizer.vocab_size) * 3)
    router = Router.for_query_document(
        query_modules=[idf],
        document_modules=[Transformer(str(base), transformer_task="fill-mask", max_seq_length=128), SpladePooling("max")])
    SparseEncoder(modules=[router], device="cpu").save(str(folder))
    return folder
