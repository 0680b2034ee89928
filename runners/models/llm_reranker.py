"""LLM rerankers in sentence-transformers' own form (5.4+): a CrossEncoder whose modules are a causal LM
(`Transformer`, `transformer_task` "text-generation") and `LogitScore`, the score being
logit[true_token_id] - logit[false_token_id] (or logit[true_token_id] alone) at the last position.
Qwen3-Reranker, mxbai-rerank-v2, bge-reranker-v2-gemma and zerank are published this way.

What the folder says is what is served: the tokens (`1_LogitScore/config.json`), the prompt template
(the tokenizer's chat template when the Transformer module takes messages: a pair is rendered as a
`query` and a `document` message, an instruction as a `system` message before them; otherwise the
tokenizer's own pair encoding with the instruction before the query), the default prompt, the window
and the activation (config_sentence_transformers.json). Truncation is the library's: the rendered prompt
is cut to the window and the template's fixed tail is written back over its last tokens.

Like runners.models.qwen3, the model is served as its transformer body plus the chosen rows of the
LM head in fp32, so the vocabulary-wide logits are never computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runners.models.checkpoint import model_file, read_json, st_modules
from runners.models.st_format import module_class, st_config

if TYPE_CHECKING:
    from infinity_emb.args import EngineArgs

# The activations a CrossEncoder may save (`activation_fn`) and how the service applies them.
ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity"}
_SIZE_KEYS = frozenset({"padding", "truncation", "max_length", "return_tensors", "pad_to_multiple_of",
                        "return_attention_mask", "restore_suffix"})


def is_llm_reranker(name_or_path: str) -> bool:
    return "LogitScore" in [module_class(str(m.get("type", ""))) for m in st_modules(name_or_path)]


@dataclass(frozen=True)
class LogitScoreFolder:
    """What a saved LLM reranker says about how it scores."""

    body_path: str  # the Transformer module's folder inside the model ("" for the root)
    true_token_id: int
    false_token_id: int | None
    messages: bool  # pairs go through the chat template as query/document messages
    structured: bool  # message contents as [{"type": "text", "text": ...}] instead of strings
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_seq_length: int | None = None
    activation: str = "sigmoid"
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


def read_folder(name_or_path: str) -> LogitScoreFolder:
    modules = st_modules(name_or_path)
    by_class = {module_class(str(m.get("type", ""))): m for m in modules}
    body, score = by_class.get("Transformer"), by_class.get("LogitScore")
    if body is None or score is None or [module_class(str(m.get("type"))) for m in modules] != ["Transformer", "LogitScore"]:
        raise ValueError(f"{name_or_path}: an LLM reranker is served as exactly a Transformer then a LogitScore module; "
                         f"modules.json has {[m.get('type') for m in modules]}: give a folder CrossEncoder.save wrote")
    score_config = read_json(model_file(name_or_path, f"{score.get('path') or '1_LogitScore'}/config.json")) or {}
    if "true_token_id" not in score_config:
        raise ValueError(f"{name_or_path}: {score.get('path')}/config.json has no true_token_id: save the model again "
                         "with sentence-transformers 5.4 or later")
    body_path = str(body.get("path") or "")
    sbert = read_json(model_file(name_or_path, f"{body_path}/sentence_bert_config.json".lstrip("/"))) or {}
    message = (sbert.get("modality_config") or {}).get("message")
    processing = sbert.get("processing_kwargs") or {}
    raw = read_json(model_file(name_or_path, "config_sentence_transformers.json")) or {}
    activation_path = str(raw.get("activation_fn") or "torch.nn.modules.activation.Sigmoid")
    activation = ACTIVATIONS.get(activation_path.rsplit(".", 1)[-1])
    if activation is None:
        raise ValueError(f"{name_or_path}: activation_fn {activation_path!r} is not served (only "
                         f"{', '.join(ACTIVATIONS)}); save the model with one of those")
    config = st_config(name_or_path)
    return LogitScoreFolder(
        body_path=body_path, true_token_id=int(score_config["true_token_id"]),
        false_token_id=None if score_config.get("false_token_id") is None else int(score_config["false_token_id"]),
        messages=message is not None, structured=(message or {}).get("format") == "structured",
        chat_template_kwargs={k: v for k, v in (processing.get("chat_template") or {}).items() if k not in _SIZE_KEYS},
        max_seq_length=sbert.get("max_seq_length"), activation=activation, prompts=dict(config.prompts),
        default_prompt_name=config.default_prompt_name,
    )


def torch_dtype(name: str | None, device: str) -> Any:
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class CausalScorer:
    """A causal LM's body and chosen rows of its LM head (fp32): `encode_core` gives, per left-padded row,
    logit[row 0] - logit[row 1] (or logit[row 0] with one row), after the model's own logit transforms
    (Gemma 2/3's final soft-capping, Cohere's logit scale). Subclasses build `encode_pre`."""

    def _load(self, engine_args: EngineArgs, path: str, token_rows: list[Any], subfolder: str = "") -> None:
        """`token_rows`: token ids (rows of the LM head) or ready fp32 vectors of the hidden size."""
        import torch
        from transformers import AutoModelForCausalLM

        ls = engine_args._loading_strategy
        device = ls.device_placement if ls is not None else "cpu"
        kwargs: dict[str, Any] = {"revision": engine_args.revision, "trust_remote_code": engine_args.trust_remote_code}
        if subfolder:
            kwargs["subfolder"] = subfolder
        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
        head = full.get_output_embeddings()
        rows = [head.weight.detach()[r] if isinstance(r, int) else r for r in token_rows]
        self.rows = torch.stack(rows).float().clone().to(device)
        bias = getattr(head, "bias", None)
        ids = [r for r in token_rows if isinstance(r, int)]
        self.bias = bias.detach()[ids].float().clone().to(device) if bias is not None and len(ids) == len(rows) else None
        text_config = full.config.get_text_config()
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.logit_scale = float(getattr(text_config, "logit_scale", None) or 1.0)
        self.body = getattr(full, full.base_model_prefix).to(device=device,
                                                            dtype=torch_dtype(engine_args.dtype.resolve(), str(device)))
        self.body.eval()
        del full
        self.device = device
        self.engine_args = engine_args

    def left_padded(self, rows: list[list[int]]) -> dict[str, Any]:
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def encode_core(self, features: dict[str, Any]) -> Any:
        import torch

        with torch.inference_mode():
            features = {k: v.to(self.device) for k, v in features.items()}
            hidden = self.body(**features).last_hidden_state[:, -1].float()
            logits = hidden @ self.rows.T
            if self.bias is not None:
                logits = logits + self.bias
            logits = logits * self.logit_scale
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            scores = logits[:, 0] - logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]
            return scores.cpu()

    def encode_post(self, out_features: Any) -> Any:
        return out_features.numpy()


class LogitScoreReranker(CausalScorer):
    """An LLM reranker as the folder describes it. `encode_pre` takes (query, document) or
    (query, document, instruction) items; an empty instruction means the model's default prompt."""

    def __init__(self, *, engine_args: EngineArgs) -> None:
        from transformers import AutoTokenizer

        path = engine_args.model_name_or_path
        self.folder = folder = read_folder(path)
        kwargs: dict[str, Any] = {"revision": engine_args.revision, "trust_remote_code": engine_args.trust_remote_code}
        if folder.body_path:
            kwargs["subfolder"] = folder.body_path
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **kwargs)
        if folder.messages and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{path}: the model takes query/document messages but its tokenizer has no chat template "
                             "(chat_template.jinja): save the model again with its tokenizer")
        self._load(engine_args, path, [t for t in (folder.true_token_id, folder.false_token_id) if t is not None],
                   folder.body_path)
        config = read_json(model_file(path, f"{folder.body_path}/config.json".lstrip("/"))) or {}
        positions = (config.get("text_config") or config).get("max_position_embeddings")
        window = folder.max_seq_length or self.tokenizer.model_max_length
        self.max_length = int(min(window, positions or window, 1 << 20))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.default_prompt = folder.prompts.get(folder.default_prompt_name or "", "")
        self._tails: dict[str, list[int]] = {}

    def _messages(self, query: str, document: str, prompt: str, filler: str | None = None) -> list[dict[str, Any]]:
        def content(text: str) -> Any:
            return [{"type": "text", "text": text}] if self.folder.structured else text

        pair = [{"role": "query", "content": content(query if filler is None else filler)},
                {"role": "document", "content": content(document if filler is None else filler)}]
        return ([{"role": "system", "content": content(prompt)}] if prompt else []) + pair

    def _render(self, conversations: list[list[dict[str, Any]]]) -> list[list[int]]:
        out = self.tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                 **self.folder.chat_template_kwargs)
        return [list(ids) for ids in out["input_ids"]]

    def _tail(self, prompt: str) -> list[int]:
        """The template's fixed tokens after the content: the common end of two renders with different
        fillers (as the library finds it), per instruction."""
        if prompt not in self._tails:
            first, second = self._render([self._messages("", "", prompt, "0"), self._messages("", "", prompt, "1 2 3 4")])
            count = 0
            for a, b in zip(reversed(first), reversed(second)):
                if a != b:
                    break
                count += 1
            self._tails[prompt] = first[len(first) - count:] if 0 < count < min(len(first), len(second)) else []
        return self._tails[prompt]

    def prompt_ids(self, items: list[tuple[str, ...]]) -> list[list[int]]:
        prompts = [(item[2] if len(item) > 2 else "") or self.default_prompt for item in items]
        if not self.folder.messages:
            pairs = [[p + item[0], item[1]] for p, item in zip(prompts, items)]
            return [list(r) for r in self.tokenizer(pairs, truncation="longest_first", max_length=self.max_length)[
                "input_ids"]]
        rows = self._render([self._messages(item[0], item[1], p) for p, item in zip(prompts, items)])
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            if len(row) > self.max_length:
                tail = self._tail(prompt)[-self.max_length:]
                rows[i] = row[: self.max_length - len(tail)] + tail
        return rows

    def encode_pre(self, items: list[tuple[str, ...]]) -> dict[str, Any]:
        return self.left_padded(self.prompt_ids(items))
