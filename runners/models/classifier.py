"""Sequence classification that keeps the logits, so `raw_scores` can return them.

Infinity's own classifier runs a transformers pipeline that always applies softmax; this model
returns one logit row per text and the service applies softmax (or sigmoid for multi-label
models) unless the request asks for raw scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infinity_emb.args import EngineArgs


class LogitClassifier:
    def __init__(self, *, engine_args: EngineArgs) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        ls = engine_args._loading_strategy
        self.device = ls.device_placement if ls is not None else "cpu"
        kwargs = {"revision": engine_args.revision, "trust_remote_code": engine_args.trust_remote_code}
        self.tokenizer = AutoTokenizer.from_pretrained(engine_args.model_name_or_path, **kwargs)
        dtype = ls.loading_dtype if ls is not None and ls.loading_dtype is not None else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(
            engine_args.model_name_or_path, torch_dtype=dtype, **kwargs
        ).to(self.device).eval()
        self.model_config = self.model.config
        self.max_length = int(min(self.tokenizer.model_max_length, 1 << 20))
        self.engine_args = engine_args

    def encode_pre(self, sentences: list[str]) -> dict[str, Any]:
        return self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def encode_core(self, features: dict[str, Any]) -> Any:
        import torch

        with torch.inference_mode():
            features = {k: v.to(self.device) for k, v in features.items()}
            return self.model(**features).logits.float().cpu()

    def encode_post(self, logits: Any) -> Any:
        return logits.numpy()
