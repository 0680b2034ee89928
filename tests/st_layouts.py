"""Tiny random versions of the classic sentence-transformers layouts (the architectures and module chains
of popular embedding models), saved by the pinned libraries: 1-2 layers, 32 wide. The tokenizers are
the tests' small ones (a WordPiece, a Unigram, a byte-level BPE): what is checked is the model class,
the module chain and the padding side, not the vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import checkpoints
import st_checkpoints

QWEN_QUERY = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
GEMMA_PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=str(checkpoints._bert_vocab(folder)), do_lower_case=True, model_max_length=128)


def _bpe_tokenizer(*, bos: bool = False, eos: bool = True, cls_sep: bool = False, padding_side: str = "right"):
    """The tests' byte-level BPE with <s>/</s> (Gemma, Mistral: bos first; Qwen: eos last), or
    ModernBERT's [CLS] ... [SEP] framing."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = checkpoints._qwen_tokenizer(append_eos=False)
    tok = base.backend_tokenizer
    tok.add_special_tokens(["<s>", "</s>", "[CLS]", "[SEP]", "<pad>"])
    ids = {t: tok.token_to_id(t) for t in ("<s>", "</s>", "[CLS]", "[SEP]")}
    if cls_sep:
        template = "[CLS] $A [SEP]"
    else:
        template = " ".join([*(["<s>"] if bos else []), "$A", *(["</s>"] if eos else [])])
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=list(ids.items()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   cls_token="[CLS]", sep_token="[SEP]", padding_side=padding_side,
                                   model_max_length=128)


def _save_base(folder: Path, model_class: Any, config: Any, tokenizer: Any, seed: int, std: float = 0.3) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config.architectures = [model_class.__name__]
    st_checkpoints.widen_keeping_norms(model_class(config).eval(), std).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _st(folder: Path, base: Path, pooling: str, extra: list[Any] | None = None, *, normalize: bool = True,
        tokenizer_args: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    transformer = Transformer(str(base), max_seq_length=128, tokenizer_args=tokenizer_args or {})
    modules = [transformer, Pooling(32, pooling_mode=pooling), *(extra or []), *([Normalize()] if normalize else [])]
    SentenceTransformer(modules=modules, device="cpu", **kwargs).save(str(folder))
    return folder


def _dense(in_features: int, out_features: int, seed: int, activation: Any = None):
    import torch
    from sentence_transformers.models import Dense

    torch.manual_seed(seed)
    return Dense(in_features, out_features, bias=activation is not None,
                 activation_function=activation if activation is not None else torch.nn.Identity(),
                 init_weight=torch.randn(out_features, in_features) * 0.3)


def bert_cls(folder: Path) -> Path:
    from transformers import BertModel

    tokenizer = _bert_tokenizer(folder.parent)
    base = _save_base(folder.parent / f"{folder.name}-base", BertModel,
                      checkpoints._bert_config(tokenizer.vocab_size), tokenizer, 10)
    return _st(folder, base, "cls")


def bert_cls_dense_tanh(folder: Path) -> Path:
    import torch
    from transformers import BertModel

    tokenizer = _bert_tokenizer(folder.parent)
    base = _save_base(folder.parent / f"{folder.name}-base", BertModel,
                      checkpoints._bert_config(tokenizer.vocab_size), tokenizer, 11)
    return _st(folder, base, "cls", [_dense(32, 24, 11, torch.nn.Tanh())], normalize=False)


def mpnet_mean(folder: Path) -> Path:
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    words = checkpoints._bert_vocab(folder.parent).read_text().split("\n")
    tokenizer = MPNetTokenizerFast(vocab={w: i for i, w in enumerate(w for w in words if w)}, model_max_length=128,
                                   bos_token="[CLS]", eos_token="[SEP]", cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]")
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    base = _save_base(folder.parent / f"{folder.name}-base", MPNetModel, config, tokenizer, 12)
    return _st(folder, base, "mean")


def xlmr_mean_prompts(folder: Path) -> Path:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tokenizer = checkpoints._xlmr_tokenizer()
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=130, pad_token_id=1)
    base = _save_base(folder.parent / f"{folder.name}-base", XLMRobertaModel, config, tokenizer, 13)
    return _st(folder, base, "mean", prompts=E5_PROMPTS)


def modernbert_cls(folder: Path) -> Path:
    from transformers import ModernBertConfig, ModernBertModel

    tokenizer = _bpe_tokenizer(cls_sep=True)
    config = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=128, local_attention=16,
                              pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                              sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                              eos_token_id=tokenizer.sep_token_id)
    base = _save_base(folder.parent / f"{folder.name}-base", ModernBertModel, config, tokenizer, 14)
    return _st(folder, base, "cls")


def t5_encoder_dense(folder: Path) -> Path:
    from transformers import T5Config, T5EncoderModel

    tokenizer = _bpe_tokenizer(eos=True)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    base = _save_base(folder.parent / f"{folder.name}-base", T5EncoderModel, config, tokenizer, 15)
    return _st(folder, base, "mean", [_dense(32, 24, 15)])


def gemma3_two_dense(folder: Path) -> Path:
    from transformers import Gemma3TextConfig, Gemma3TextModel

    tokenizer = _bpe_tokenizer(bos=True, eos=True)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                              sliding_window=16, use_bidirectional_attention=True,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    base = _save_base(folder.parent / f"{folder.name}-base", Gemma3TextModel, config, tokenizer, 16, std=0.2)
    return _st(folder, base, "mean", [_dense(32, 64, 16), _dense(64, 32, 17)], prompts=GEMMA_PROMPTS,
               similarity_fn_name="cosine")


def qwen2_last_token_left(folder: Path) -> Path:
    from transformers import Qwen2Config, Qwen2Model

    tokenizer = _bpe_tokenizer(eos=True, padding_side="left")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    base = _save_base(folder.parent / f"{folder.name}-base", Qwen2Model, config, tokenizer, 18, std=0.5)
    return _st(folder, base, "lasttoken", tokenizer_args={"padding_side": "left"}, prompts={"query": QWEN_QUERY})


def mistral_last_token_right(folder: Path) -> Path:
    from transformers import MistralConfig, MistralModel

    tokenizer = _bpe_tokenizer(bos=True, eos=True, padding_side="right")
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                           pad_token_id=tokenizer.pad_token_id, sliding_window=None)
    base = _save_base(folder.parent / f"{folder.name}-base", MistralModel, config, tokenizer, 19, std=0.5)
    return _st(folder, base, "lasttoken", tokenizer_args={"padding_side": "right"},
               prompts={"query": "Instruct: Retrieve semantically similar text.\nQuery: "})


def bert_without_st_files(folder: Path) -> Path:
    from transformers import BertModel

    tokenizer = _bert_tokenizer(folder.parent)
    return _save_base(folder, BertModel, checkpoints._bert_config(tokenizer.vocab_size), tokenizer, 20)


LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "bert-cls": bert_cls, "bert-cls-dense-tanh": bert_cls_dense_tanh, "mpnet-mean": mpnet_mean,
    "xlmr-mean-prompts": xlmr_mean_prompts, "modernbert-cls": modernbert_cls, "t5-encoder-dense": t5_encoder_dense,
    "gemma3-two-dense": gemma3_two_dense, "qwen2-last-token-left": qwen2_last_token_left,
    "mistral-last-token-right": mistral_last_token_right, "bert-no-st-files": bert_without_st_files,
}
