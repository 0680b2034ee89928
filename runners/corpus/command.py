"""The corpus command: a file of texts in, Parquet shards of vectors out (docs/corpus.md).

    python -m runners.corpus INPUT OUT_DIR [--model NAME_OR_PATH] [--text-column text] [--id-column id]
                             [--resume] [--server URL ...] [--ray]

The loop: read a shard (checked row by row), hand it to the embedder (in this process, or the servers),
keep `--prefetch` shards in flight so the model never waits on the reader, and write each finished shard
whole. Ctrl-C stops reading and writes the shards in flight (a second Ctrl-C drops them): the run stops
at a shard boundary and `--resume` continues it; a killed run loses at most the shards in flight.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runners.corpus import io
from runners.corpus.embedder import EmbedOptions
from runners.corpus.io import CorpusError

MANIFEST = "_corpus.json"
INTERRUPTED = 130
# What a resumed run must share with the run that wrote the folder.
SAME_ON_RESUME = ("format", "text_column", "id_column", "shard_rows", "options")


class Embedder(Protocol):
    def submit(self, texts: list[str]) -> Any: ...  # a concurrent.futures.Future of the vectors
    def metadata(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


@dataclass
class Job:
    input: Path
    out_dir: Path
    format: str | None = None
    text_column: str = "text"
    id_column: str = "id"
    shard_rows: int = 10_000
    resume: bool = False
    options: EmbedOptions = field(default_factory=EmbedOptions)
    prefetch: int = 2
    progress: bool = True

    def manifest(self, fmt: str) -> dict[str, Any]:
        return {"input": str(self.input.resolve()), "format": fmt, "text_column": self.text_column,
                "id_column": self.id_column, "shard_rows": self.shard_rows, "options": self.options.as_dict()}


@dataclass
class Summary:
    rows: int = 0  # rows embedded by this run
    shards: int = 0  # shards written by this run
    skipped: int = 0  # shards a previous run had written
    seconds: float = 0.0
    interrupted: bool = False


class StopFlag:
    """The first SIGINT asks the run to stop at the next shard boundary; the second interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> Any:
        """Handle SIGINT; returns the handler it replaced."""
        return signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ncorpus: stopping after the shards in flight are written (Ctrl-C again drops them)", file=sys.stderr)


def prepare_out_dir(job: Job, fmt: str) -> dict[int, int]:
    """The shards already written that this run keeps (index -> rows); refuses a folder of another run."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = job.out_dir / MANIFEST
    written = io.written_shards(job.out_dir)
    wanted = job.manifest(fmt)
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise CorpusError(f"{manifest_path} is not readable JSON ({exc}): choose another OUT_DIR") from None
        if not job.resume:
            raise CorpusError(f"{job.out_dir} holds a corpus run already ({len(written)} shards): --resume continues "
                              "it; choose another OUT_DIR to start over")
        differs = [k for k in SAME_ON_RESUME if old.get(k) != wanted[k]]
        if differs:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in differs)
            now = ", ".join(f"{k}={wanted[k]!r}" for k in differs)
            raise CorpusError(f"--resume: {job.out_dir} was written with {was}; this run asks {now}: resume with the "
                              "same options, or write to another OUT_DIR")
        if old.get("input") != wanted["input"]:
            print(f"corpus: resuming from {old.get('input')} with {wanted['input']}", file=sys.stderr)
        return written
    if written:
        raise CorpusError(f"{job.out_dir} holds {len(written)} shard files but no {MANIFEST}: choose an empty OUT_DIR")
    manifest_path.write_text(json.dumps(wanted, indent=1))
    return {}


def _finish(job: Job, embedder: Embedder, shard: io.Shard, future: Any) -> int:
    matrix = future.result()
    if len(matrix) != len(shard.ids):
        raise CorpusError(f"shard {shard.index}: {len(matrix)} vectors for {len(shard.ids)} texts")
    io.write_shard(io.shard_path(job.out_dir, shard.index), io.shard_table(shard.ids, matrix, embedder.metadata()))
    return len(shard.ids)


def run_corpus(job: Job, embedder: Embedder, stop: StopFlag | None = None) -> Summary:
    """Embed `job.input` into shards in `job.out_dir` (see the module docstring)."""
    from tqdm import tqdm

    if job.shard_rows < 1:
        raise CorpusError(f"--shard-rows {job.shard_rows}: give a positive number of rows per shard")
    fmt = io.detect_format(job.input, job.format)
    written = prepare_out_dir(job, fmt)
    stop = stop or StopFlag()
    summary = Summary(skipped=len(written))
    started = time.perf_counter()
    bar = tqdm(total=io.count_rows(job.input, fmt), initial=sum(written.values()), unit=" texts", unit_scale=True,
               disable=not job.progress, dynamic_ncols=True, smoothing=0.05, file=sys.stderr)
    pending: deque[tuple[io.Shard, Any]] = deque()

    def finish_oldest() -> None:
        shard, future = pending.popleft()
        rows = _finish(job, embedder, shard, future)
        summary.rows += rows
        summary.shards += 1
        bar.update(rows)

    try:
        try:
            for shard in io.read_shards(job.input, fmt, job.text_column, job.id_column, job.shard_rows,
                                        skip=written.__contains__):
                if stop.requested:
                    summary.interrupted = True
                    break
                pending.append((shard, embedder.submit(shard.texts)))
                while len(pending) >= max(1, job.prefetch) or (pending and pending[0][1].done()):
                    finish_oldest()
        except CorpusError:
            while pending:  # a bad row stops the run; the shards before it are written
                finish_oldest()
            raise
        while pending:
            finish_oldest()
    finally:
        for _, future in pending:
            future.cancel()
        bar.close()
    summary.seconds = time.perf_counter() - started
    if not summary.interrupted:
        manifest_path = job.out_dir / MANIFEST
        manifest = json.loads(manifest_path.read_text())
        manifest.update(complete=True, shards=len(io.written_shards(job.out_dir)), metadata=embedder.metadata())
        manifest_path.write_text(json.dumps(manifest, indent=1))
    return summary


# ---- the command line ----


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m runners.corpus",
        description="Embed a corpus (JSONL, CSV or Parquet) into Parquet shards with columns id and embedding.")
    p.add_argument("input", type=Path, metavar="INPUT", help="a .jsonl, .csv or .parquet file")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the folder of part-NNNNN.parquet shards")
    p.add_argument("--model", help="in this process: a hub id, a folder or a bento: tag (default: the embedded "
                                   "all-MiniLM-L6-v2, or MODEL_NAMES); with --server: the served model's name")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default="id")
    p.add_argument("--resume", action="store_true", help="keep the shards OUT_DIR has and write the others")
    p.add_argument("--server", action="append", metavar="URL", default=[],
                   help="send the texts to this running server (repeat for several) instead of loading the model")
    p.add_argument("--ray", action="store_true", help="read, embed and write with Ray Data (pip install '.[ray]')")
    p.add_argument("--format", choices=sorted(set(io.FORMATS.values())), help="the input's format (default: its extension)")
    p.add_argument("--shard-rows", type=int, default=10_000, help="rows per output shard (default 10000)")
    p.add_argument("--input-type", help="query or document: the model's prompt")
    p.add_argument("--prompt-name", help="a prompt of the model by name")
    p.add_argument("--dimensions", type=int, help="keep the first N dimensions (matryoshka), re-normalized")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="vectors as the model gives them")
    p.add_argument("--embedding-type", default="float", choices=["float", "int8", "uint8", "binary", "ubinary"])
    p.add_argument("--output", default="dense", choices=["dense", "sparse"],
                   help="sparse: {indices, values} per text, from a SPLADE or BGE-M3 model")
    p.add_argument("--prefetch", type=int, default=2, help="shards in flight per worker (default 2)")
    p.add_argument("--workers", type=int, help="in this process: worker processes, one per GPU (default: WORKERS, "
                                               "else one per visible GPU, 1 on a CPU)")
    p.add_argument("--concurrency", type=int, default=4, help="with --server: requests in flight per server")
    p.add_argument("--request-texts", type=int, default=256, help="with --server: texts per request")
    p.add_argument("--retries", type=int, default=8, help="with --server: tries per request on 429/503/connection errors")
    p.add_argument("--api-key", help="with --server: the servers' API_KEY")
    p.add_argument("--ray-address", help="with --ray: the cluster's address, or local (default: RAY_ADDRESS, else local)")
    p.add_argument("--ray-actors", type=int, default=1, help="with --ray: model replicas (default 1)")
    p.add_argument("--ray-gpus", type=float, default=0, help="with --ray: GPUs per replica (default 0)")
    p.add_argument("--ray-cpus", type=float, default=1, help="with --ray: CPUs per replica (default 1)")
    p.add_argument("--ray-num-cpus", type=int, help="with --ray on a local cluster: its CPUs (default: all)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def job_of(args: argparse.Namespace) -> Job:
    options = EmbedOptions(model=args.model, input_type=args.input_type, prompt_name=args.prompt_name,
                           dimensions=args.dimensions, normalize=args.normalize, embedding_type=args.embedding_type,
                           output=args.output)
    return Job(input=args.input, out_dir=args.out_dir, format=args.format, text_column=args.text_column,
               id_column=args.id_column, shard_rows=args.shard_rows, resume=args.resume, options=options,
               prefetch=args.prefetch, progress=args.progress)


def make_embedder(args: argparse.Namespace, options: EmbedOptions) -> Embedder:
    if args.server:
        from runners.corpus.client import ServerEmbedder

        return ServerEmbedder(args.server, options, concurrency=args.concurrency, request_texts=args.request_texts,
                              retries=args.retries, api_key=args.api_key)
    from runners.corpus.embedder import LocalEmbedder, prepare_environment
    from runners.workers import worker_count

    count = args.workers or worker_count(prepare_environment(options))
    if count > 1:
        from runners.corpus.pool import WorkerPool

        return WorkerPool(options, count)
    return LocalEmbedder(options)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    job = job_of(args)
    stop = StopFlag()
    previous = None if args.ray else stop.install()  # Ray stops its own workers on Ctrl-C
    embedder: Embedder | None = None
    try:
        if args.ray:
            from runners.corpus.ray_stage import run_ray

            if args.server:
                raise CorpusError("--ray and --server do not go together: Ray runs the model in its own actors")
            summary = run_ray(job, address=args.ray_address, actors=args.ray_actors, gpus=args.ray_gpus,
                              cpus=args.ray_cpus, local_cpus=args.ray_num_cpus)
        else:
            io.detect_format(job.input, job.format)  # a wrong input fails before the model loads
            embedder = make_embedder(args, job.options)
            job.prefetch *= getattr(embedder, "workers", 1)
            summary = run_corpus(job, embedder, stop)
    except CorpusError as exc:
        print(f"corpus: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("corpus: interrupted; the shards written are kept: run again with --resume", file=sys.stderr)
        return INTERRUPTED
    finally:
        if embedder is not None:
            embedder.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    rate = summary.rows / summary.seconds if summary.seconds else 0.0
    print(f"corpus: {summary.rows} texts in {summary.shards} shards written to {job.out_dir} ({rate:.1f} texts/s; "
          f"{summary.skipped} shards kept from before)", file=sys.stderr)
    if summary.interrupted:
        print("corpus: stopped at a shard boundary: run again with --resume to continue", file=sys.stderr)
        return INTERRUPTED
    return 0
