"""The corpus embedder as a Ray Data stage, and `--ray` on the corpus command (docs/corpus.md, Ray Data).

    import ray
    from ray.data import ActorPoolStrategy
    from runners.corpus.ray_stage import EmbedBatches

    ds = ray.data.read_parquet("s3://bucket/docs/", columns=["id", "text"])
    ds.map_batches(EmbedBatches, fn_constructor_kwargs={"model": "BAAI/bge-small-en-v1.5"},
                   batch_format="pyarrow", batch_size=1024, num_gpus=1,
                   compute=ActorPoolStrategy(size=8, max_concurrent_calls_per_actor=2,
                                             enable_true_multi_threading=True)
                   ).write_parquet("s3://bucket/vectors/")

Each actor loads the model once (runners.corpus.embedder.LocalEmbedder: the service's own embedding path,
so its vectors are the server's); a batch in gives a pyarrow table out with `id` and `embedding` (a
fixed-size list, float32 or the quantized type asked), the model in the schema's metadata. Two calls in
flight per actor keep its scheduler fed while Ray moves the next batch. Ray is an optional extra
(`pip install '.[ray]'`); nothing in the service imports this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from runners.corpus import io
from runners.corpus.embedder import EmbedOptions, LocalEmbedder
from runners.corpus.io import CorpusError


class EmbedBatches:
    """A callable class for `Dataset.map_batches` (batch_format "pyarrow", or "numpy": a dict of arrays)."""

    def __init__(self, model: str | None = None, text_column: str = "text", id_column: str = "id",
                 input_type: str | None = None, prompt_name: str | None = None, dimensions: int | None = None,
                 normalize: bool = True, embedding_type: str = "float", output: str = "dense",
                 env: dict[str, str] | None = None) -> None:
        self.text_column, self.id_column = text_column, id_column
        self.embedder = LocalEmbedder(EmbedOptions(model=model, input_type=input_type, prompt_name=prompt_name,
                                                   dimensions=dimensions, normalize=normalize,
                                                   embedding_type=embedding_type, output=output), env=env)

    def __call__(self, batch: Any) -> Any:
        pa = io.pyarrow()
        table = batch if isinstance(batch, pa.Table) else None
        names = table.column_names if table is not None else list(batch)
        for column in (self.text_column, self.id_column):
            if column not in names:
                raise CorpusError(f"the dataset has no column {column!r} (its columns: {', '.join(map(repr, names))}): "
                                  "pass text_column= and id_column=")
        ids = table.column(self.id_column) if table is not None else pa.array(list(batch[self.id_column]))
        raw = table.column(self.text_column).to_pylist() if table is not None else list(batch[self.text_column])
        texts = [io.check_text(t, lambda i=i: f"the row with id {ids[i].as_py()!r}", self.text_column)
                 for i, t in enumerate(raw)]
        matrix = self.embedder.embed(texts)
        out = io.shard_table(ids, matrix, self.embedder.metadata())
        if table is not None or not isinstance(matrix, np.ndarray):
            return out
        return {"id": batch[self.id_column], "embedding": matrix}

    def __del__(self) -> None:
        embedder = getattr(self, "embedder", None)
        if embedder is not None:
            embedder.close()


def _read(ray: Any, path: Path, fmt: str, text_column: str, id_column: str) -> Any:
    pa = io.pyarrow()
    if fmt == "parquet":
        return ray.data.read_parquet(str(path), columns=[id_column, text_column])
    if fmt == "jsonl":
        return ray.data.read_json(str(path), lines=True)
    import pyarrow.csv

    # As the command reads CSV: every value a string (ids too).
    return ray.data.read_csv(str(path), convert_options=pyarrow.csv.ConvertOptions(
        column_types={id_column: pa.string(), text_column: pa.string()}))


def run_ray(job: Any, *, address: str | None = None, actors: int = 1, gpus: float = 0, cpus: float = 1,
            local_cpus: int | None = None) -> Any:
    """The corpus command's read, embed and write with Ray Data: on the cluster at `address` (or RAY_ADDRESS),
    else on a local one of `local_cpus` CPUs. Returns the command's Summary."""
    import time

    from runners.corpus.command import Summary

    try:
        import ray
        from ray.data import ActorPoolStrategy
    except ImportError:
        raise CorpusError("--ray needs Ray Data: pip install '.[ray]' (ray[data], pandas)") from None
    if job.resume:
        raise CorpusError("--resume is not available with --ray (Ray Data names its own files): run without --ray "
                          "to resume, or write to an empty OUT_DIR")
    fmt = io.detect_format(job.input, job.format)
    if job.out_dir.exists() and any(job.out_dir.glob("*.parquet")):
        raise CorpusError(f"{job.out_dir} holds Parquet files already: --ray writes to an empty OUT_DIR")
    started_here = not ray.is_initialized()
    if started_here:
        if address in (None, "local") and not os.environ.get("RAY_ADDRESS") or address == "local":
            ray.init(num_cpus=local_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address)
    started = time.perf_counter()
    try:
        ds = _read(ray, job.input, fmt, job.text_column, job.id_column)
        names = ds.schema().names
        for column in (job.text_column, job.id_column):
            if column not in names:
                raise CorpusError(f"{job.input} has no column {column!r} (its columns: {', '.join(map(repr, names))}): "
                                  "name them with --text-column and --id-column")
        o = job.options
        stage = ds.map_batches(
            EmbedBatches, batch_format="pyarrow", batch_size=min(job.shard_rows, 1024),
            fn_constructor_kwargs={"model": o.model, "text_column": job.text_column, "id_column": job.id_column,
                                   "input_type": o.input_type, "prompt_name": o.prompt_name,
                                   "dimensions": o.dimensions, "normalize": o.normalize,
                                   "embedding_type": o.embedding_type, "output": o.output},
            compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
            num_gpus=gpus or None, num_cpus=cpus)
        stage.write_parquet(str(job.out_dir), min_rows_per_file=job.shard_rows)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
        raise CorpusError(f"the Ray job failed: {cause}") from None
    finally:
        if started_here:
            ray.shutdown()
    seconds = time.perf_counter() - started
    files = sorted(job.out_dir.glob("*.parquet"))
    rows = sum(io.pyarrow().parquet.read_metadata(f).num_rows for f in files)
    (job.out_dir / "_corpus.json").write_text(json.dumps({**job.manifest(fmt), "ray": True, "complete": True,
                                                          "shards": len(files)}, indent=1))
    return Summary(rows=rows, shards=len(files), seconds=seconds)
