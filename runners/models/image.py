"""Texts and images into one space: CLIP, SigLIP and SigLIP2 (any checkpoint whose model has
`get_text_features` and `get_image_features`), served by two replicas over one model.

`DualEncoder` loads the model, its tokenizer and its image processor once; its two sides are the
replicas the engine batches, each with a scheduler of its own (runners.engine.registry), so a text
and an image never share a forward pass:

- `TextSide`: `encode_pre` tokenizes with the model's own tokenizer, cut at its real window (the
  tokenizer's maximum, bounded by the text tower's positions: 77 for CLIP, 64 for SigLIP; not
  `config.max_length`, the generation default of 20 that Infinity reads). Rows stay unpadded and
  are padded per batch as the tokenizer pads: to the batch's longest, or to the full window for
  models trained that way (SigLIP, SigLIP2, and any tokenizer without an attention mask), so a
  text's vector does not depend on the texts it is batched with. A row's length is its tokens.
- `ImageSide`: `prepare` runs the model's own image processor on one decoded RGB image (the
  capability calls it, in a worker thread, right after decoding: the full-size image is dropped at
  once); `encode_pre` passes prepared images on, each counted as the tokens its vision tower reads
  (patches, plus the class token where the tower has one), so images take their share of the
  padded-token budget as texts do.

`encode_core` runs `get_text_features` / `get_image_features`; `encode_post` returns one float32
vector per item. Vectors are the model's own features, unnormalized: the service normalizes per
request (the model's similarity is the cosine of these, scaled).

Each side brings its own `batch_codec` (how rows are split and re-padded), which the scheduler uses
instead of learning one from a probe: SigLIP pads every text to the same width, and pixel tensors
are not token rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infinity_emb.args import EngineArgs

# Text towers trained on texts padded to their full window (their tokenizers may not say so).
FULL_WINDOW_MODEL_TYPES = ("siglip", "siglip2")


def has_feature_methods(config: dict[str, Any]) -> bool:
    """The checkpoint's model class (transformers' own for its model_type, or remote code that names
    a CLIP-like model) has both `get_text_features` and `get_image_features`."""
    if "vision_config" not in config or "text_config" not in config:
        return False
    model_type = str(config.get("model_type", ""))
    auto_map = config.get("auto_map") or {}
    if "AutoModel" in auto_map:
        return "clip" in model_type or "siglip" in model_type  # e.g. jina-clip: checked again once loaded
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    cls = getattr(transformers, str(MODEL_MAPPING_NAMES.get(model_type, "")), None)
    return cls is not None and hasattr(cls, "get_text_features") and hasattr(cls, "get_image_features")


def _features(output: Any) -> Any:
    """A tensor of features, whether the model returns one or an output object."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for name in ("text_embeds", "image_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output[0]


@dataclass
class PreparedImage:
    """One image after the model's processor: its tensors (without the batch axis) and its tokens."""

    features: dict[str, Any]
    tokens: int


class DualEncoder:
    """A CLIP-like model, its tokenizer and image processor, on its device; `text` and `images` are its replicas."""

    def __init__(self, *, engine_args: EngineArgs) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        path = engine_args.model_name_or_path
        ls = engine_args._loading_strategy
        self.device = ls.device_placement if ls is not None else "cpu"
        dtype = ls.loading_dtype if ls is not None and ls.loading_dtype is not None else torch.float32
        kwargs = {"revision": engine_args.revision, "trust_remote_code": engine_args.trust_remote_code}
        self.model = AutoModel.from_pretrained(path, dtype=dtype, **kwargs).to(self.device).eval()
        for method in ("get_text_features", "get_image_features"):
            if not hasattr(self.model, method):
                raise ValueError(f"{path}: {type(self.model).__name__} has no {method}: it is not a CLIP-like model")
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        # The slow processor: transformers' reference implementation (numpy and PIL, no torchvision).
        self.processor = AutoImageProcessor.from_pretrained(path, use_fast=False, **kwargs)
        config = self.model.config
        text_config = getattr(config, "text_config", config)
        limit = int(min(self.tokenizer.model_max_length, 1 << 20))
        positions = getattr(text_config, "max_position_embeddings", None)
        self.max_length = min(limit, int(positions)) if positions else limit
        self.full_window = (getattr(config, "model_type", "") in FULL_WINDOW_MODEL_TYPES
                            or "attention_mask" not in self.tokenizer.model_input_names)
        self.text = TextSide(self)
        self.images = ImageSide(self)
        probe = self.images.prepare(_blank_image())
        self.image_tokens = probe.tokens  # for a square image; SigLIP2's own resolution varies it
        self.dimensions = int(self.images.encode_core(self.images.batch_codec.collate([probe.features])).shape[-1])

    def to_device(self, features: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in features.items()}


def _blank_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (64, 48), color=(127, 127, 127))


class _Tower:
    """What both replicas run: the model's `get_<tower>_features` on a batch, one float32 row each."""

    encoder: DualEncoder
    tower: str  # "text" or "image"

    def encode_core(self, features: dict[str, Any]) -> Any:
        import torch

        with torch.inference_mode():
            forward = getattr(self.encoder.model, f"get_{self.tower}_features")
            return _features(forward(**self.encoder.to_device(features)))

    def encode_post(self, out: Any) -> list[Any]:
        return list(out.float().cpu().numpy())


class TextSide(_Tower):
    """The replica of the text tower (see the module docstring)."""

    tower = "text"

    def __init__(self, encoder: DualEncoder) -> None:
        tokenizer = encoder.tokenizer
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = encoder.max_length
        self.keys = [k for k in tokenizer.model_input_names if k in ("input_ids", "attention_mask", "token_type_ids")]
        pad = tokenizer.pad_token_id
        self.pad_values = {"input_ids": pad if pad is not None else (tokenizer.eos_token_id or 0),
                           "attention_mask": 0, "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
        self.batch_codec = TextCodec(self.keys, self.pad_values, tokenizer.padding_side == "left",
                                     encoder.max_length if encoder.full_window else None)

    def encode_pre(self, texts: list[str]) -> list[tuple[dict[str, Any], int]]:
        import torch

        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)
        rows = []
        for i in range(len(texts)):
            row = {k: torch.tensor(encoded[k][i], dtype=torch.long) for k in self.keys if k in encoded}
            rows.append((row, len(encoded["input_ids"][i])))
        return rows

class ImageSide(_Tower):
    """The replica of the vision tower (see the module docstring)."""

    tower = "image"

    def __init__(self, encoder: DualEncoder) -> None:
        self.encoder = encoder
        self.processor = encoder.processor
        vision = getattr(encoder.model, "vision_model", None)
        embeddings = getattr(vision, "embeddings", None)
        self.num_positions = getattr(embeddings, "num_positions", None)
        vision_config = getattr(encoder.model.config, "vision_config", None)
        self.patch_size = int(getattr(vision_config, "patch_size", 0) or 16)
        self.batch_codec = ImageCodec()

    def resized_pixels(self, width: int, height: int) -> int:
        """Pixels of the processor's resized image before any crop: CLIP's processor scales the shorter
        side to `shortest_edge`, so a 1 x 100,000 strip would become 224 x 22,400,000 pixels."""
        size = getattr(self.processor, "size", None) or {}
        short = size.get("shortest_edge") if isinstance(size, dict) else None
        if short:
            return int(short * math.ceil(short * max(width, height) / max(1, min(width, height))))
        if isinstance(size, dict) and size.get("height") and size.get("width"):
            return int(size["height"] * size["width"])
        return width * height

    def prepare(self, image: Any) -> PreparedImage:
        """One decoded RGB image through the model's own processor (blocking: a worker thread runs it)."""
        out = self.processor(images=[image], return_tensors="pt")
        features = {k: v[0] for k, v in out.items() if hasattr(v, "shape")}
        return PreparedImage(features, self.tokens(features))

    def tokens(self, features: dict[str, Any]) -> int:
        """What the vision tower reads: its patches (and class token) for this image."""
        mask = features.get("pixel_attention_mask")
        if mask is not None:  # SigLIP2: as many patches as the image's own resolution gives
            return int(mask.sum())
        if self.num_positions:
            return int(self.num_positions)
        pixels = features["pixel_values"]
        return max(1, int(pixels.shape[-1] * pixels.shape[-2]) // (self.patch_size * self.patch_size))

    def encode_pre(self, images: list[PreparedImage]) -> list[tuple[dict[str, Any], int]]:
        return [(image.features, image.tokens) for image in images]

class TextCodec:
    """Unpadded token rows; a batch padded as the tokenizer pads (its side and pad values), to the
    longest row, or to `width` for full-window models."""

    def __init__(self, keys: list[str], pad_values: dict[str, int], pad_left: bool, width: int | None) -> None:
        self.keys, self.pad_values, self.pad_left, self.width = keys, pad_values, pad_left, width

    def split(self, rows: list[tuple[dict[str, Any], int]]) -> list[tuple[dict[str, Any], int]]:
        return rows

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = self.width or max(len(r["input_ids"]) for r in rows)
        out = {}
        for key in rows[0]:
            batch = torch.full((len(rows), width), self.pad_values.get(key, 0), dtype=rows[0][key].dtype)
            for i, r in enumerate(rows):
                n = len(r[key])
                if self.pad_left:
                    batch[i, width - n:] = r[key]
                else:
                    batch[i, :n] = r[key]
            out[key] = batch
        return out


class ImageCodec:
    """Prepared images; a batch is their tensors stacked (a processor gives every image one shape)."""

    def split(self, rows: list[tuple[dict[str, Any], int]]) -> list[tuple[dict[str, Any], int]]:
        return rows

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
