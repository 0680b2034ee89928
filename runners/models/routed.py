"""Routed models: sentence-transformers' `Router` module, one route of modules per task ("query",
"document", or the model's own route names), e.g. inference-free sparse models whose query route is a
lookup (`SparseStaticEmbedding`) and whose document route is a transformer.

The model is loaded by the library itself (SentenceTransformer or SparseEncoder) and every route runs the
library's own modules; this replica only batches. Each item is a `RoutedText` (text and task); the
route is the library's choice for that task (`Router._resolve_route`: its mappings, then the route of
that name, then the default route for no task). Items of several routes share a batch: `encode_pre`
tokenizes each route's items with that route's input module and lays them out as one right-padded
batch with a row of task indices; `encode_core` runs each route's rows through its modules (re-padded
as that module pads), then the modules after the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runners.models.checkpoint import model_file, read_json, st_modules
from runners.models.st_format import module_class, st_config
from runners.vocabulary import SPARSE

if TYPE_CHECKING:
    from infinity_emb.args import EngineArgs

SPARSE_MODULES = frozenset({"SpladePooling", "SparseStaticEmbedding", "IDF", "MLMTransformer", "SparseAutoEncoder"})
TASK_ROW = "routed_task"  # a [batch, tokens] feature: the item's task index in every position


def is_routed(name_or_path: str) -> bool:
    modules = st_modules(name_or_path)
    return bool(modules) and module_class(str(modules[0].get("type", ""))) == "Router"


@dataclass(frozen=True, slots=True)
class RoutedText:
    """One text of a routed model and the task it is encoded for (None: the model's default route)."""

    text: str
    task: str | None = None


class RoutedEncoder:
    """A routed SentenceTransformer (dense vectors) or SparseEncoder (sparse: (ids, weights) per item)."""

    def __init__(self, *, engine_args: EngineArgs) -> None:
        from sentence_transformers import SentenceTransformer, SparseEncoder

        path = engine_args.model_name_or_path
        ls = engine_args._loading_strategy
        self.device = str(ls.device_placement if ls is not None else "cpu")
        # Older saves (opensearch's inference-free models) may lack model_type: their route modules say it.
        router_dir = str(st_modules(path)[0].get("path") or "")
        types = (read_json(model_file(path, f"{router_dir}/router_config.json".lstrip("/"))) or {}).get("types") or {}
        self.sparse = st_config(path).model_type == "SparseEncoder" or any(
            module_class(str(t)) in SPARSE_MODULES for t in types.values())
        model_class = SparseEncoder if self.sparse else SentenceTransformer
        self.model = model_class(path, device=self.device, trust_remote_code=engine_args.trust_remote_code,
                                 revision=engine_args.revision).eval()
        self.router = self.model[0]
        self.after = list(self.model)[1:]
        self.routes = tuple(self.router.sub_modules)
        mapped = [task for task, _ in self.router.route_mappings if task is not None]
        self.tasks: tuple[str | None, ...] = (None, *dict.fromkeys([*self.routes, *mapped]))
        # The service's tokenizer (counting, decoding, TEI's /tokenize): the default route's, else the first
        # route's that is a transformers tokenizer (a StaticEmbedding holds a bare `tokenizers` one).
        inputs = [self.router.sub_modules[r][0] for r in (self.default_route(), *self.routes)]
        self.tokenizer = next((m.tokenizer for m in inputs if hasattr(getattr(m, "tokenizer", None), "convert_ids_to_tokens")),
                              None)
        self.max_seq_length = int(min(max(getattr(m[0], "max_seq_length", None) or 512
                                          for m in self.router.sub_modules.values()), 1 << 20))
        self.prompts = dict(self.model.prompts or {})
        self.engine_args = engine_args

    def route_of(self, task: str | None) -> str:
        """The route the library takes for `task`; ValueError (naming the routes) when it has none."""
        return self.router._resolve_route(task=task, modality="text")

    def default_route(self) -> str:
        return self.route_of(None)

    def get_embedding_dimension(self) -> int | None:
        return self.model.get_embedding_dimension()

    # ---- the replica protocol ----

    def encode_pre(self, items: list[Any]) -> dict[str, Any]:
        import torch

        items = [i if isinstance(i, RoutedText) else RoutedText(str(i)) for i in items]
        rows: list[tuple[list[int], list[int]] | None] = [None] * len(items)
        for task in dict.fromkeys(i.task for i in items):
            chosen = [n for n, i in enumerate(items) if i.task == task]
            module = self.router.sub_modules[self.route_of(task)][0]
            features = module.preprocess([items[n].text for n in chosen], task=task)
            for n, ids in zip(chosen, _token_rows(features)):
                rows[n] = (ids, [self.tasks.index(task)] * max(len(ids), 1))
        width = max(max(len(r[1]) for r in rows if r is not None), 1)
        out = {k: torch.zeros((len(items), width), dtype=torch.long) for k in ("input_ids", "attention_mask", TASK_ROW)}
        for n, (ids, tasks) in enumerate(r for r in rows if r is not None):
            # An empty text (a lookup route gives it no token) keeps one masked-in placeholder position.
            out["input_ids"][n, : len(ids)] = torch.tensor(ids, dtype=torch.long) if ids else 0
            out["attention_mask"][n, : len(tasks)] = 1
            out[TASK_ROW][n, : len(tasks)] = torch.tensor(tasks, dtype=torch.long)
        out["token_counts"] = out["attention_mask"].clone()
        for n, (ids, _) in enumerate(r for r in rows if r is not None):
            out["token_counts"][n, : max(len(ids), 1)] = 1 if ids else 0
        return out

    def encode_core(self, features: dict[str, Any]) -> Any:
        import torch

        task_rows = features[TASK_ROW][:, 0].tolist()
        lengths = features["token_counts"].sum(1).tolist()
        results: list[Any] = [None] * len(task_rows)
        with torch.inference_mode():
            for index in dict.fromkeys(task_rows):
                task = self.tasks[index]
                chosen = [n for n, t in enumerate(task_rows) if t == index]
                ids = [features["input_ids"][n, : int(lengths[n])].tolist() for n in chosen]
                modules = self.router.sub_modules[self.route_of(task)]
                batch = _route_features(modules[0], ids, self.device)
                batch.update({"task": task, "modality": "text"})
                for module in [*modules, *self.after]:
                    kwargs = {k: v for k, v in (("task", task), ("modality", "text"))
                              if k in getattr(module, "forward_kwargs", ())}
                    batch = module(batch, **kwargs)
                vectors = batch["sentence_embedding"].float().cpu()
                for j, n in enumerate(chosen):
                    results[n] = vectors[j]
        return torch.stack(results)

    def encode_post(self, out_features: Any) -> Any:
        import numpy as np

        vectors = out_features.numpy()
        if not self.sparse:
            return vectors
        rows = []
        for row in vectors:
            ids = np.nonzero(row)[0]
            rows.append({SPARSE: (ids, row[ids].astype(np.float32))})
        return rows


def _token_rows(features: dict[str, Any]) -> list[list[int]]:
    """Each text's token ids from an input module's `preprocess`: a padded batch with its mask, or
    StaticEmbedding's flat ids with offsets."""
    ids = features["input_ids"]
    if "offsets" in features:
        bounds = [*features["offsets"].tolist(), len(ids)]
        return [ids[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
    mask = features.get("attention_mask")
    return [[int(t) for t, m in zip(row.tolist(), (mask[i].tolist() if mask is not None else [1] * len(row))) if m]
            for i, row in enumerate(ids)]


def _route_features(module: Any, rows: list[list[int]], device: str) -> dict[str, Any]:
    """The features `module.preprocess` would have given for these token rows."""
    import torch

    if module_class(type(module).__name__) == "StaticEmbedding":
        flat = [t for row in rows for t in row]
        offsets = [0]
        for row in rows[:-1]:
            offsets.append(offsets[-1] + len(row))
        return {"input_ids": torch.tensor(flat, dtype=torch.long, device=device),
                "offsets": torch.tensor(offsets, dtype=torch.long, device=device)}
    tokenizer = getattr(module, "tokenizer", None)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    width = max(max(len(r) for r in rows), 1)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cut = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cut] = torch.tensor(row, dtype=torch.long)
        mask[i, cut] = 1
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if tokenizer is not None and "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return out
