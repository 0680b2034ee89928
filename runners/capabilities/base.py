"""What every capability shares: the request limits, the model's prompt for a request, and the
per-model accounting (stats and metrics)."""

from __future__ import annotations

import asyncio

from runners import metrics
from runners.engine.loaded import LoadedModel
from runners.engine.registry import EngineRegistry
from runners.errors import BadRequest, PayloadTooLarge
from runners.models.qwen3 import embedding_instruction
from runners.settings import Settings


class Capability:
    settings: Settings
    registry: EngineRegistry

    @staticmethod
    def _account(model: LoadedModel, capability: str, items: int, tokens: int) -> None:
        model.stats.requests += 1
        model.stats.items += items
        model.stats.tokens += tokens
        counters = metrics.of(model.name, capability)
        counters.requests.inc()
        counters.items.inc(items)
        counters.tokens.inc(tokens)
        counters.request_items.observe(items)

    # ---- limits ----

    def _check_count(self, count: int, param: str) -> None:
        if not count:
            raise BadRequest(f"'{param}' is empty: send at least one text", param=param, code="empty_input")
        if count > self.settings.max_items:
            raise PayloadTooLarge(
                f"'{param}' has {count} items; the limit is MAX_ITEMS_PER_REQUEST={self.settings.max_items}: "
                "split the request",
                param=param,
                code="too_many_items",
            )

    def _check_texts(self, texts: list[str], param: str) -> None:
        self._check_count(len(texts), param)
        for i, text in enumerate(texts):
            if not text:
                raise BadRequest(f"'{param}[{i}]' is an empty string: send non-empty text", param=param,
                                 code="empty_input")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise BadRequest(
                        f"'{param}[{i}]' holds a lone UTF-16 surrogate ({text[exc.start]!r}) at character {exc.start}: "
                        "send valid Unicode (escape pairs like \\ud83d\\ude00 must come in pairs)",
                        param=param, code="invalid_text",
                    ) from None
            if len(text) > self.settings.max_chars:
                raise PayloadTooLarge(
                    f"'{param}[{i}]' has {len(text)} characters; the limit is "
                    f"MAX_CHARS_PER_TEXT={self.settings.max_chars}",
                    param=param,
                    code="text_too_long",
                )
        self._check_read_chars(sum(map(len, texts)), f"{len(texts)} texts", param)

    def _check_items(self, count: int, what: str, param: str) -> None:
        """Every item that reaches a model counts against MAX_ITEMS_PER_REQUEST, whatever shape carried it
        (texts, the parts of Cohere inputs, chunks)."""
        if count > self.settings.max_items:
            raise PayloadTooLarge(
                f"this request reaches the model as {count} items ({what}); the limit is "
                f"MAX_ITEMS_PER_REQUEST={self.settings.max_items}: split the request",
                param=param, code="too_many_items")

    def _check_read_chars(self, total: int, what: str, param: str) -> None:
        """The characters one request makes the model read, copies included (a prompt on every text, a
        query with every document), within MAX_CHARS_PER_REQUEST: checked before any copy is made."""
        if total > self.settings.max_request_chars:
            raise PayloadTooLarge(
                f"this request makes the model read {total} characters ({what}); the limit is "
                f"MAX_CHARS_PER_REQUEST={self.settings.max_request_chars}: split the request, or send a shorter "
                "instruction or query", param=param, code="too_many_characters")

    def _check_prompted(self, texts: list[str], prompt: str, param: str) -> None:
        """Each text as the model reads it, its prompt (or instruction) in front, within MAX_CHARS_PER_TEXT, and
        all of them within MAX_CHARS_PER_REQUEST, before `prompt + text` is built."""
        if prompt:
            room = self.settings.max_chars - len(prompt)
            for i, text in enumerate(texts):
                if len(text) > room:
                    raise PayloadTooLarge(
                        f"'{param}[{i}]' has {len(text)} characters and the prompt or instruction put before it "
                        f"{len(prompt)}; the limit is MAX_CHARS_PER_TEXT={self.settings.max_chars} for both together: "
                        "send a shorter instruction or text", param=param, code="text_too_long")
        self._check_read_chars(sum(map(len, texts)) + len(prompt) * len(texts),
                               f"{len(texts)} texts" + (f", each after a prompt of {len(prompt)}" if prompt else ""), param)

    def _check_token_rows(self, ids: list[list[int]], param: str) -> None:
        """Token-id inputs are decoded to text before anything else: their size is bounded first, as texts'
        are (a token decodes to at least one character, or to nothing)."""
        self._check_count(len(ids), param)
        for i, row in enumerate(ids):
            if len(row) > self.settings.max_chars:
                raise PayloadTooLarge(f"'{param}[{i}]' has {len(row)} token ids; the limit is MAX_CHARS_PER_TEXT="
                                      f"{self.settings.max_chars}", param=param, code="text_too_long")
        self._check_read_chars(sum(map(len, ids)), f"{len(ids)} rows of token ids", param)

    async def _reject_long(self, model: LoadedModel, texts: list[str], param: str) -> None:
        """`truncate: false`: a text longer than the model's window is an error, not silently cut."""
        lengths = [len(ids) for ids in await asyncio.to_thread(model.tokenize, texts)]
        for i, n in enumerate(lengths):
            if n > model.max_tokens:
                raise PayloadTooLarge(
                    f"'{param}[{i}]' has {n} tokens and truncate is off; model {model.name!r} reads at most "
                    f"{model.max_tokens} tokens (its window, special tokens included): send chunking: "
                    '{"pooling": "mean"} (or "none") on /embed, /v1/embeddings or /v2/embed to embed it in windows, '
                    "truncate: true to embed its first tokens, or a shorter text",
                    param=param,
                    code="text_too_long",
                )

    @staticmethod
    def _check_vocabulary(model: LoadedModel, ids: list[list[int]], param: str, allow_empty: bool = False) -> None:
        """Every id inside the model's vocabulary (and, for inputs, no empty row), named by its row."""
        vocab = model.vocab_size
        for i, row in enumerate(ids):
            if not row and not allow_empty:
                raise BadRequest(f"'{param}[{i}]' is an empty token list", param=param)
            bad = next((t for t in row if t < 0 or t >= vocab), None)
            if bad is not None:
                raise BadRequest(
                    f"'{param}[{i}]' has token id {bad}, outside the vocabulary of {model.name!r} (0..{vocab - 1})",
                    param=param,
                )


    def _task(self, model: LoadedModel, input_type: str | None, prompt_name: str | None = None) -> str | None:
        """The task that picks a routed model's route: `prompt_name` when it names one of its tasks, else
        `input_type`; None (the library's default route) when neither is given. None for other models."""
        if not model.route_tasks:
            return None
        task = prompt_name if prompt_name in model.route_tasks else input_type
        try:
            model.replica.route_of(task)
        except ValueError:
            raise BadRequest(f"model {model.name!r} has no route for {task!r}: send input_type or prompt_name naming one "
                             f"of {', '.join(model.route_tasks)}", param="input_type", code="unknown_route") from None
        return task

    def _prompt(self, model: LoadedModel, input_type: str | None, instruction: str | None,
                prompt_name: str | None = None) -> str:
        default = model.prompts.get(model.default_prompt_name, "") if model.default_prompt_name else ""
        if input_type not in (None, "query", "document") and input_type not in model.route_tasks:
            routes = f" or one of its routes ({', '.join(model.route_tasks)})" if model.route_tasks else ""
            raise BadRequest(f"input_type {input_type!r} is not known to model {model.name!r}: send query, document, "
                             f"search_query, search_document, passage, classification or clustering{routes}",
                             param="input_type", code="unknown_input_type")
        if prompt_name is not None and prompt_name not in model.prompts and prompt_name in model.route_tasks:
            return default  # a route of a routed model (self._task), which has no prompt of that name
        if prompt_name is not None:
            if prompt_name not in model.prompts:
                known = ", ".join(sorted(model.prompts)) or "none"
                raise BadRequest(f"prompt_name {prompt_name!r} is not a prompt of model {model.name!r} (its prompts: {known})",
                                 param="prompt_name", code="unknown_prompt")
            return model.prompts[prompt_name]
        if instruction is not None:
            # Instruction models (Qwen3, gte-Qwen, e5-mistral) take the task inside their template;
            # for any other model the instruction is the prefix itself.
            if model.prompts.get("query", "").startswith("Instruct:"):
                return embedding_instruction(instruction)
            return instruction
        if input_type == "query":
            return model.prompts.get("query", "")
        if input_type == "document":
            return model.prompts.get("document", model.prompts.get("passage", default))
        return default

