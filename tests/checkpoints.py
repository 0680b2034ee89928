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
    tokenizer = BertTokenizerFast(vocab_file=str(_bert_vocab(folder)), do_lower_case=True, model_max_length=128)
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
    tokenizer = BertTokenizerFast(vocab_file=str(base / "vocab.txt"), do_lower_case=True, model_max_length=512)
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
