"""Tiny checkpoints of the architectures the service serves, built locally with random weights.

No model hub is reachable from the build machines, so the tests make small models of the real
architectures (BERT cross-encoder and classifier, Qwen3 embedding and reranker), save them as
the hub would ship them, and serve them through the real loading code.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a an of to and in is was for on with as by at from that this it be are or not have has "
    "cat cats dog dogs car cars sat mat paris france capital city river museum tower eiffel "
    "what where who how when why which query document passage answer search web relevant "
    "berlin germany london england rome italy madrid spain tokyo japan weather rain sun "
    "machine learning model vector embedding rerank score yes no good bad fast slow "
    "quick brown fox jumps over lazy red blue green small large long short text hello world"
).split()

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _widen(model, std: float):
    """Redraw every weight from N(0, std): the default init is so narrow that a random model gives
    nearly the same score to every input, and ordering checks would prove nothing."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def _bert_vocab(folder: Path) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"],
             *list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-:")]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def build_bert_classifier(folder: Path, num_labels: int, seed: int = 0) -> Path:
    """A 2-layer BERT with a sequence-classification head: 1 label = cross-encoder, more = classifier."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(_bert_vocab(folder)), do_lower_case=True, model_max_length=128)
    torch.manual_seed(seed)
    labels = {i: name for i, name in enumerate(["negative", "neutral", "positive", "other"][:num_labels])}
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
        id2label=labels if num_labels > 1 else {0: "LABEL_0"},
        label2id={v: k for k, v in labels.items()} if num_labels > 1 else {"LABEL_0": 0},
    )
    config.architectures = ["BertForSequenceClassification"]
    model = _widen(BertForSequenceClassification(config).eval(), 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _qwen_tokenizer(append_eos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(WORDS), "yes no yes no", "Judge whether the Document meets the requirements based on the "
              "Query and the Instruct provided. Note that the answer can only be yes or no.", "system user assistant",
              "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    for word in ("yes", "no"):
        assert tok.token_to_id(word) is not None, f"tiny tokenizer lacks a single {word!r} token"
    if append_eos:
        eos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A $B <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>" if not append_eos else "<|endoftext|>",
        pad_token="<|endoftext|>", padding_side="left", model_max_length=8192,
    )


def _qwen3_config(vocab_size: int, tie: bool):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=8192, tie_word_embeddings=tie,
        pad_token_id=0,
    )


def build_qwen3_reranker(folder: Path, seed: int = 0, tie: bool = True) -> Path:
    """A tiny `Qwen3ForCausalLM` saved with a chat tokenizer that has single `yes`/`no` tokens."""
    import torch
    from transformers import Qwen3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer(append_eos=False)
    torch.manual_seed(seed)
    config = _qwen3_config(len(tokenizer), tie)
    config.architectures = ["Qwen3ForCausalLM"]
    model = _widen(Qwen3ForCausalLM(config).eval(), 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_qwen3_seq_cls(causal: Path, folder: Path) -> Path:
    """The `*-seq-cls` conversion people publish: one label, weight = W_lm[yes] - W_lm[no]."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(causal)
    lm = Qwen3ForCausalLM.from_pretrained(causal)
    config = lm.config
    config.num_labels = 1
    config.architectures = ["Qwen3ForSequenceClassification"]
    seq = Qwen3ForSequenceClassification(config)
    seq.model.load_state_dict(lm.model.state_dict())
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    with torch.no_grad():
        seq.score.weight.copy_((lm.lm_head.weight[yes] - lm.lm_head.weight[no]).unsqueeze(0))
    seq.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_qwen3_embedding(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-Embedding: last-token pooling, normalization, the query prompt in its ST config."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import Qwen3Model

    base = folder.parent / (folder.name + "-base")
    base.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer(append_eos=True)
    torch.manual_seed(seed)
    config = _qwen3_config(len(tokenizer), True)
    config.architectures = ["Qwen3Model"]
    model = _widen(Qwen3Model(config).eval(), 0.5)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=512, tokenizer_args={"padding_side": "left"})
    st = SentenceTransformer(
        modules=[transformer, Pooling(32, pooling_mode="lasttoken"), Normalize()],
        prompts={"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
                 "document": ""},
        default_prompt_name=None,
        device="cpu",
    )
    st.save(str(folder))
    return folder


FAULTY_MODELING = '''"""A BERT encoder that misbehaves on purpose, for the fault tests (custom code: trust_remote_code).

- a text holding the word `boom` makes the forward pass raise RuntimeError;
- `vanish` raises SystemExit, which ends the thread that runs the model (a loop that dies);
- `freeze` blocks the forward pass for an hour (a hung device);
- a batch of more than `oom_above_tokens` padded tokens raises torch.OutOfMemoryError.
"""

import time

import torch
from transformers import BertModel


class FaultyBertModel(BertModel):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        config = self.config
        if input_ids is not None:
            if (input_ids == config.boom_token_id).any():
                raise RuntimeError("faulty model: the word 'boom' was in the batch")
            if (input_ids == config.vanish_token_id).any():
                raise SystemExit("faulty model: the word 'vanish' ends the model thread")
            if (input_ids == config.freeze_token_id).any():
                time.sleep(3600)
            limit = getattr(config, "oom_above_tokens", 0)
            if limit and input_ids.numel() > limit:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate a batch of {input_ids.numel()} tokens (limit {limit})"
                )
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
'''


def build_faulty_embedder(folder: Path, oom_above_tokens: int = 0) -> Path:
    """A sentence-transformers folder whose model is `FaultyBertModel` from its own modeling file."""
    import json
    import shutil

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    base = folder.parent / (folder.name + "-base")
    base.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "boom", "vanish", "freeze"]
    (base / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(base / "vocab.txt"), do_lower_case=True, model_max_length=512)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    _widen(BertModel(config).eval(), 0.3).save_pretrained(base)
    tokenizer.save_pretrained(base)
    (base / "modeling_faulty.py").write_text(FAULTY_MODELING)
    saved = json.loads((base / "config.json").read_text())
    saved.update(architectures=["FaultyBertModel"], auto_map={"AutoModel": "modeling_faulty.FaultyBertModel"},
                 boom_token_id=tokenizer.convert_tokens_to_ids("boom"),
                 vanish_token_id=tokenizer.convert_tokens_to_ids("vanish"),
                 freeze_token_id=tokenizer.convert_tokens_to_ids("freeze"), oom_above_tokens=oom_above_tokens)
    (base / "config.json").write_text(json.dumps(saved, indent=2))
    transformer = Transformer(str(base), max_seq_length=512, model_args={"trust_remote_code": True},
                              config_args={"trust_remote_code": True})
    st = SentenceTransformer(modules=[transformer, Pooling(32), Normalize()], device="cpu")
    st.save(str(folder))
    shutil.copy(base / "modeling_faulty.py", folder / "modeling_faulty.py")
    assert type(SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)[0].auto_model).__name__ == \
        "FaultyBertModel", "the saved folder must load the custom model class"
    return folder


# ---- sparse and multi-vector models (runners.models.multi_output) ----


def _bert_config(vocab_size: int, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **extra)


def build_splade(folder: Path, seed: int = 0, allowed_words: tuple[str, ...] = ()) -> Path:
    """A tiny `BertForMaskedLM` (SPLADE's architecture) on the tiny BERT vocabulary, no sentence-transformers files.

    With `allowed_words`, every other vocabulary entry gets an MLM bias of -100: its logit can never
    be positive, so the sparse vector may only hold those words (a check that ids are vocabulary ids).
    """
    import torch
    from transformers import BertForMaskedLM, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(_bert_vocab(folder)), do_lower_case=True, model_max_length=128)
    torch.manual_seed(seed)
    config = _bert_config(tokenizer.vocab_size)
    config.architectures = ["BertForMaskedLM"]
    model = _widen(BertForMaskedLM(config).eval(), 0.3)
    if allowed_words:
        allowed = tokenizer.convert_tokens_to_ids(list(allowed_words))
        with torch.no_grad():
            bias = torch.full((tokenizer.vocab_size,), -100.0)
            bias[allowed] = 2.0
            model.cls.predictions.bias.copy_(bias)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_mlm_embedder(folder: Path, seed: int = 0) -> Path:
    """A sentence-transformers embedding model whose config says `BertForMaskedLM`, as all-mpnet-base-v2's
    says `MPNetForMaskedLM`: it must stay a dense model, not become SPLADE."""
    import json

    build_bert_embedder(folder, seed=seed)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_bert_embedder(folder: Path, seed: int = 0, pooling: str = "mean") -> Path:
    """A plain sentence-transformers BERT embedder (Transformer, Pooling, Normalize)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertModel, BertTokenizerFast

    base = folder.parent / (folder.name + "-base")
    base.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(_bert_vocab(base)), do_lower_case=True, model_max_length=128)
    torch.manual_seed(seed)
    config = _bert_config(tokenizer.vocab_size)
    config.architectures = ["BertModel"]
    _widen(BertModel(config).eval(), 0.3).save_pretrained(base)
    tokenizer.save_pretrained(base)
    st = SentenceTransformer(modules=[Transformer(str(base), max_seq_length=128), Pooling(32, pooling_mode=pooling),
                                      Normalize()], device="cpu")
    st.save(str(folder))
    return folder


def _xlmr_tokenizer():
    """An XLM-RoBERTa-shaped fast tokenizer (Unigram, <s> … </s>, <pad> = 1) trained here on WORDS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 20 + [" ".join(reversed(WORDS))] * 20, trainer=trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3], "XLM-R's special ids are 0..3"
    return XLMRobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>", model_max_length=126,
    )


def build_bge_m3(folder: Path, seed: int = 0, colbert_dim: int = 32) -> Path:
    """A BAAI/bge-m3-shaped folder: a tiny XLM-RoBERTa encoder (with its CLS pooling sentence-transformers
    files, as bge-m3 ships them) and FlagEmbedding's heads `sparse_linear.pt` (hidden -> 1) and
    `colbert_linear.pt` (hidden -> colbert_dim), saved as FlagEmbedding saves them (state dicts)."""
    import json

    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _xlmr_tokenizer()
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
    )
    config.architectures = ["XLMRobertaModel"]
    model = _widen(XLMRobertaModel(config, add_pooling_layer=False).eval(), 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    sparse, colbert = torch.nn.Linear(32, 1), torch.nn.Linear(32, colbert_dim)
    with torch.no_grad():
        sparse.weight.normal_(0, 0.5)
        sparse.bias.fill_(0.1)
        colbert.weight.normal_(0, 0.3)
    torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
    torch.save(colbert.state_dict(), folder / "colbert_linear.pt")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 126, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    return folder


def _colbert_vocab(folder: Path) -> Path:
    vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
             *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"], *list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-:")]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def build_colbert_stanford(folder: Path, seed: int = 0, dim: int = 16, query_maxlen: int = 12, doc_maxlen: int = 40,
                           attend_to_mask_tokens: bool = False) -> Path:
    """A Stanford ColBERT checkpoint as colbert-ir/colbertv2.0 ships it: config.json with `HF_ColBERT`,
    one weights file with `bert.*` and `linear.weight` (no bias), settings in `artifact.metadata`."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(_colbert_vocab(folder)), do_lower_case=True, model_max_length=512)
    torch.manual_seed(seed)
    config = _bert_config(tokenizer.vocab_size)
    bert = _widen(BertModel(config, add_pooling_layer=False).eval(), 0.3)
    state = {f"bert.{k}": v.contiguous() for k, v in bert.state_dict().items()}
    state["linear.weight"] = torch.randn(dim, 32) * 0.3
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["HF_ColBERT"]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "artifact.metadata").write_text(json.dumps({
        "query_token_id": "[unused0]", "doc_token_id": "[unused1]", "query_maxlen": query_maxlen,
        "doc_maxlen": doc_maxlen, "dim": dim, "similarity": "cosine", "mask_punctuation": True,
        "attend_to_mask_tokens": attend_to_mask_tokens,
    }, indent=2))
    return folder


def build_colbert_pylate(folder: Path, seed: int = 0, dim: int = 16, query_length: int = 12,
                         document_length: int = 40, attend_to_expansion_tokens: bool = False) -> Path:
    """A PyLate ColBERT folder: a sentence-transformers Transformer whose tokenizer has the added
    tokens "[Q] " and "[D] ", a `pylate.models.Dense.Dense` projection without bias in 1_Dense/, and
    PyLate's settings in config_sentence_transformers.json."""
    import json
    import string

    import torch
    from safetensors.torch import save_file
    from transformers import BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(_bert_vocab(folder)), do_lower_case=True, model_max_length=512)
    tokenizer.add_tokens(["[Q] ", "[D] "])
    torch.manual_seed(seed)
    config = _bert_config(len(tokenizer))
    config.architectures = ["BertModel"]
    _widen(BertModel(config, add_pooling_layer=False).eval(), 0.3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"},
    ], indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": document_length - 1,
                                                                  "do_lower_case": False}))
    (folder / "1_Dense").mkdir(exist_ok=True)
    (folder / "1_Dense" / "config.json").write_text(json.dumps({
        "in_features": 32, "out_features": dim, "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False,
    }))
    save_file({"linear.weight": torch.randn(dim, 32) * 0.3}, str(folder / "1_Dense" / "model.safetensors"))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({
        "query_prefix": "[Q] ", "document_prefix": "[D] ", "query_length": query_length,
        "document_length": document_length, "attend_to_expansion_tokens": attend_to_expansion_tokens,
        "skiplist_words": list(string.punctuation), "do_query_expansion": True, "similarity_fn_name": "MaxSim",
        "prompts": {}, "default_prompt_name": None,
    }, indent=2))
    return folder


# ---- texts and images in one space (runners.models.image) ----


def _tiny_towers(model, std: float = 0.3):
    """Widen every weight but the layer norms: the default init maps every input to nearly one vector."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std)
    return model


def _clip_tokenizer(folder: Path):
    """CLIP's byte-level BPE, written by hand: every byte (alone and word-final) and a few merges, as
    transformers' own CLIP tokenizer tests build it; <|endoftext|> (eos and pad) has the highest id."""
    import json

    from transformers import CLIPTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>",
              "r e", "re d</w>", "b l", "bl u", "blu e</w>"]
    vocab = list(dict.fromkeys([*chars, *[c + "</w>" for c in chars], *[m.replace(" ", "") for m in merges],
                                "<|startoftext|>", "<|endoftext|>"]))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                             model_max_length=77)


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A `CLIPModel` with 32-wide 2-layer towers (images 32 x 32, patches of 4: 65 vision tokens), its
    tokenizer (window 77) and `CLIPImageProcessor` (shortest edge 32, center crop) saved beside it."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer(folder)
    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**tower, "image_size": 32, "patch_size": 4}, projection_dim=32,
    )
    config.architectures = ["CLIPModel"]
    _tiny_towers(CLIPModel(config).eval()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_tiny_siglip(folder: Path, seed: int = 0, window: int = 16) -> Path:
    """A `SiglipModel` with 32-wide 2-layer towers (images 32 x 32, patches of 4: 64 vision tokens), a
    word-level tokenizer that, like SigLIP's, appends </s> and returns no attention mask (window 16:
    texts are padded to it, as SigLIP was trained), and `SiglipImageProcessor` at 32 x 32."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

    folder.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "</s>", "<unk>", *WORDS, "photo", "picture", *"abcdefghijklmnopqrstuvwxyz0123456789.,?!'-:"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        model_max_length=window, model_input_names=["input_ids"])
    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": window,
                     "pad_token_id": vocab["<pad>"], "eos_token_id": vocab["</s>"]},
        vision_config={**tower, "image_size": 32, "patch_size": 4},
    )
    config.architectures = ["SiglipModel"]
    _tiny_towers(SiglipModel(config).eval()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_foreign_code_embedder(folder: Path, code_repo: str = "other-org/other-repo") -> Path:
    """A BERT embedder whose config.json asks for its model class from another repository
    (`auto_map` "other-org/other-repo--modeling_x.Model"): TRUST_REMOTE_CODE must refuse it at start."""
    import json

    build_bert_embedder(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": f"{code_repo}--modeling_x.Model", "AutoConfig": f"{code_repo}--configuration_x.Config"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
