"""Qwen3-Embedding prompts and the Qwen3-Reranker served as a one-label cross-encoder.

The reranker is a causal LM that answers "yes" or "no". Its score is
sigmoid(logit_yes - logit_no), and logit_yes - logit_no = h_last · (W_lm[yes] - W_lm[no]), so the
model is served as its transformer body plus a one-row fp32 head: the project's scheduler
(runners.engine.scheduler) batches it like any cross-encoder and the 151k-wide LM head is never computed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runners.models.llm_reranker import CausalScorer, torch_dtype

if TYPE_CHECKING:
    from infinity_emb.args import EngineArgs


DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_MAX_LENGTH = 8192


def embedding_instruction(task: str) -> str:
    """The query prompt of Qwen3-Embedding (and other `Instruct:` models) for a task."""
    return f"Instruct: {task}\nQuery:"


def rerank_body_start(query: str, instruction: str | None) -> str:
    """Everything of the prompt body before the document text; the document follows verbatim."""
    return f"<Instruct>: {instruction or DEFAULT_TASK}\n<Query>: {query}\n<Document>: "


def is_qwen3_reranker(name_or_path: str, config: dict[str, Any]) -> bool:
    """A Qwen3 causal LM (or its `*-seq-cls` conversion) whose name marks it a reranker."""
    archs = config.get("architectures") or []
    if config.get("model_type") != "qwen3":
        return False
    is_causal = "Qwen3ForCausalLM" in archs
    is_seq_cls = "Qwen3ForSequenceClassification" in archs and len(config.get("id2label") or {"0": 0}) == 1
    return (is_causal or is_seq_cls) and "rerank" in name_or_path.lower()


class Qwen3Reranker(CausalScorer):
    """Qwen3-Reranker as a cross-encoder replica: exact prompt, left padding, yes−no head in fp32.

    The scheduler hands `encode_pre` (query, document) pairs; the service passes the query already
    formatted by `rerank_body_start`, so body = query + document with no whitespace stripped.
    """

    def __init__(self, *, engine_args: EngineArgs) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        path = engine_args.model_name_or_path
        ls = engine_args._loading_strategy
        device = ls.device_placement if ls is not None else "cpu"
        dtype = torch_dtype(engine_args.dtype.resolve(), str(device))
        kwargs = {"revision": engine_args.revision, "trust_remote_code": engine_args.trust_remote_code}
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **kwargs)
        config = AutoConfig.from_pretrained(path, **kwargs)
        if "Qwen3ForSequenceClassification" in (config.architectures or []):
            full = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, **kwargs)
            head = full.score.weight.detach()[0].float().clone()
        else:
            full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
            yes = self.tokenizer.convert_tokens_to_ids("yes")
            no = self.tokenizer.convert_tokens_to_ids("no")
            if yes is None or no is None or yes == self.tokenizer.unk_token_id or no == self.tokenizer.unk_token_id:
                raise ValueError(f"{path}: the tokenizer has no single 'yes'/'no' token, so it is not a Qwen3 reranker")
            weight = full.get_output_embeddings().weight.detach()
            head = (weight[yes] - weight[no]).float().clone()
        self.body = full.model.to(device=device, dtype=dtype).eval()
        del full
        # CausalScorer's one-row form: score = h_last · (W_lm[yes] - W_lm[no]), in fp32.
        self.rows = head[None].to(device)
        self.bias, self.softcap, self.logit_scale = None, None, 1.0
        self.device = device
        self.prefix_ids = self.tokenizer(RERANK_PREFIX, add_special_tokens=False)["input_ids"]
        self.suffix_ids = self.tokenizer(RERANK_SUFFIX, add_special_tokens=False)["input_ids"]
        self.max_length = RERANK_MAX_LENGTH
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.engine_args = engine_args

    def prompt_ids(self, bodies: list[str]) -> list[list[int]]:
        budget = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        encoded = self.tokenizer(bodies, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
        return [self.prefix_ids + ids + self.suffix_ids for ids in encoded]

    def encode_pre(self, queries_docs: list[tuple[str, str]]) -> dict[str, Any]:
        return self.left_padded(self.prompt_ids([q + d for q, d in queries_docs]))
