"""`BACKEND=optimum`: sentence-transformers models exported to ONNX once, served by ONNX Runtime.

Infinity's own optimum path fails on a local folder ("No onnx files found") and, given an
exported file, hands optimum an absolute path where it wants a relative one. This module exports
with torch's ONNX exporter (offline; optimum's needs transformers < 4.58), optionally quantizes to
int8 (dynamic, weights only), keeps the result in a cache folder keyed by model and options, and
applies the model's own sentence-transformers pooling and normalization, so vectors match the torch path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runners.models.checkpoint import legacy_pooling

if TYPE_CHECKING:
    from infinity_emb.args import EngineArgs

log = logging.getLogger("embed_rerank.onnx")
EXPORT_VERSION = "4"  # bump when the export recipe changes, so old caches are not reused


def _fingerprint(folder: Path) -> str:
    """Model identity for the cache key: file names, sizes and modification times."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(folder)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def local_folder(name_or_path: str) -> Path:
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path))


def signed_int8_weights() -> bool:
    """Whether this CPU multiplies unsigned 8-bit activations by signed 8-bit weights natively (x86
    VNNI: `vpdpbusd`). ONNX Runtime's int8 MatMul then runs U8S8, measured 1.3-1.4 x its U8U8 path on
    this machine (AMD EPYC, AVX-512 VNNI), at the same accuracy; without VNNI its U8S8 kernel
    (`vpmaddubsw`) can saturate, so weights stay unsigned there (ONNX Runtime's own advice)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _hidden_state_module(model: Any, names: list[str]) -> Any:
    """The transformer body as a module of positional token features, returning the last hidden state."""
    import torch

    class Body(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *features: Any) -> Any:
            return self.model(**dict(zip(names, features, strict=True))).last_hidden_state

    return Body().eval()


def export_feature_extraction(folder: Path, onnx_path: Path) -> None:
    """The model's transformer body (the folder's first sentence-transformers module, or the folder
    itself) as ONNX: token features in, last hidden state out, batch and sequence axes dynamic.

    optimum's exporter (optimum-onnx 0.1) requires transformers < 4.58, so the export is this
    project's: torch's TorchScript-based exporter, the one optimum's used, with the same names, so
    the int8 recipe below finds the same nodes."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    sub = next((m.get("path", "") for m in modules if m.get("type", "").endswith("Transformer")), "")
    body_folder = folder / sub if sub else folder
    tokenizer = AutoTokenizer.from_pretrained(body_folder)
    model = AutoModel.from_pretrained(body_folder, dtype=torch.float32, attn_implementation="eager").eval()
    sample = tokenizer(["a first text to trace", "a second"], padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    dynamic = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    dynamic["last_hidden_state"] = {0: "batch_size", 1: "sequence_length"}
    with torch.no_grad():
        torch.onnx.export(_hidden_state_module(model, names), tuple(sample[n] for n in names), str(onnx_path),
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=dynamic,
                          opset_version=17, do_constant_folding=True, dynamo=False)


def exported_model(name_or_path: str, quantization: str, cache_dir: Path) -> Path:
    """The ONNX file for a model and quantization: from the cache, or exported now (atomically)."""
    source = local_folder(name_or_path)
    key = f"{source.name}-{_fingerprint(source)}-v{EXPORT_VERSION}"
    target = cache_dir / key
    signed = quantization == "int8" and signed_int8_weights()
    onnx_file = target / ("model.onnx" if quantization != "int8" else "model_int8s8.onnx" if signed
                          else "model_int8.onnx")
    if onnx_file.is_file():
        return onnx_file
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not (target / "model.onnx").is_file():
        log.info("exporting %s to ONNX into %s (once; later starts reuse it)", source, target)
        tmp = Path(tempfile.mkdtemp(prefix=key + ".", dir=cache_dir))
        try:
            export_feature_extraction(source, tmp / "model.onnx")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if quantization == "int8" and not onnx_file.is_file():
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        log.info("quantizing %s to int8 (dynamic, per channel, MatMul only, %s weights)", target / "model.onnx",
                 "signed" if signed else "unsigned")
        partial = target / f"{onnx_file.name}.partial"
        # Measured on all-MiniLM-L6-v2, cosine to fp32 over the bench corpus: the default recipe
        # (per tensor, every op) min 0.92; per channel on MatMul weights min 0.989 (1.39x fp32);
        # the same with the FFN down-projections kept in fp32 (their inputs carry the outliers)
        # min 0.994, mean 0.997 (1.30x fp32).
        graph = onnx.load(str(target / "model.onnx"), load_external_data=False).graph
        keep_fp32 = [n.name for n in graph.node if n.op_type == "MatMul"
                     and n.name.endswith("/output/dense/MatMul") and "/attention/" not in n.name]
        quantize_dynamic(target / "model.onnx", partial, weight_type=QuantType.QInt8 if signed else QuantType.QUInt8,
                         per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_fp32)
        os.replace(partial, onnx_file)
    return onnx_file


def _st_config(folder: Path) -> tuple[str, bool, int | None, dict[str, str]]:
    """(pooling mode, normalize, max_seq_length, prompts) from the sentence-transformers files."""
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    pooling, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg = legacy_pooling(json.loads((folder / module["path"] / "config.json").read_text()))
            pooling = next(
                (m for m in ("cls_token", "lasttoken", "max_tokens", "mean_tokens") if cfg.get(f"pooling_mode_{m}")),
                "mean_tokens",
            )
        elif kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Dense"):
            raise ValueError(f"{folder}: a Dense module after pooling is not supported by BACKEND=optimum; use torch")
    bert_cfg = folder / "sentence_bert_config.json"
    max_len = json.loads(bert_cfg.read_text()).get("max_seq_length") if bert_cfg.is_file() else None
    st_cfg = folder / "config_sentence_transformers.json"
    prompts = json.loads(st_cfg.read_text()).get("prompts") or {} if st_cfg.is_file() else {}
    return pooling, normalize, max_len, prompts


class OnnxEmbedder:
    """An embedding replica (Infinity's protocol) running an ONNX Runtime session."""

    def __init__(self, *, engine_args: EngineArgs, quantization: str, cache_dir: Path, threads: int) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = local_folder(engine_args.model_name_or_path)
        self.pooling, self.normalize, max_len, self.prompts = _st_config(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.max_seq_length = int(max_len or min(self.tokenizer.model_max_length, 8192))
        onnx_file = exported_model(engine_args.model_name_or_path, quantization, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(onnx_file), options, providers=providers)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.dimension = int(self.session.get_outputs()[0].shape[-1])
        self.onnx_file = onnx_file
        self.engine_args = engine_args

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    def encode_pre(self, sentences: list[str]) -> dict[str, np.ndarray]:
        features = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_seq_length,
                                  return_tensors="np")
        return {k: v.astype(np.int64) for k, v in features.items() if k in self.input_names}

    def encode_core(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        hidden = self.session.run(None, features)[0]
        return hidden, features["attention_mask"]

    def encode_post(self, out: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        hidden, mask = out
        hidden = hidden.astype(np.float32)
        if self.pooling == "cls_token":
            pooled = hidden[:, 0]
        elif self.pooling == "lasttoken":
            # Last attended position of each row, whichever side the tokenizer pads.
            last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
            pooled = hidden[np.arange(hidden.shape[0]), last]
        elif self.pooling == "max_tokens":
            pooled = np.where(mask[..., None] > 0, hidden, -1e9).max(axis=1)
        else:
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        if self.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled
