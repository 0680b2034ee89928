"""The corpus command (runners/corpus): formats, shards and resume, hostile input, interruptions (SIGINT,
SIGKILL), server mode against a real server, equality with the service, and the Ray Data stage.

Most tests share one in-process engine (the packaged MiniLM) and call `run_corpus` directly; the
interruption tests run the real command as a process and stop it half way.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.csv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from load_tests.processes import ROOT, hermetic_env  # noqa: E402
from runners.corpus import io  # noqa: E402
from runners.corpus.command import Job, main, run_corpus  # noqa: E402
from runners.corpus.embedder import EmbedOptions, LocalEmbedder  # noqa: E402
from runners.corpus.io import CorpusError  # noqa: E402


def corpus(n: int, seed: int = 0, id_offset: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": id_offset + i, "text": " ".join(f"word{rng.randint(0, 99999):05d}" for _ in range(rng.randint(1, 40)))}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), path)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # row groups that do not match the shards
    return path


def read_out(out_dir: Path) -> tuple[list, np.ndarray]:
    """Every shard's ids and vectors, in shard order."""
    files = sorted(out_dir.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    column = table.column("embedding").combine_chunks()
    matrix = column.values.to_numpy().reshape(len(table), column.type.list_size)
    return table.column("id").to_pylist(), matrix


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def embedder() -> Iterator[LocalEmbedder]:
    e = LocalEmbedder(EmbedOptions(), env=hermetic_env())
    yield e
    e.close()


def job(input: Path, out_dir: Path, **kw) -> Job:
    kw.setdefault("shard_rows", 10)
    return Job(input=input, out_dir=out_dir, progress=False, **kw)


# ---- formats and shards ----


@pytest.mark.parametrize("writer,suffix", [(write_jsonl, ".jsonl"), (write_csv, ".csv"), (write_parquet, ".parquet")])
def test_each_format_gives_the_same_vectors_as_the_engine(embedder, tmp_path, writer, suffix):
    rows = corpus(45)
    summary = run_corpus(job(writer(tmp_path / f"in{suffix}", rows), tmp_path / "out"), embedder)
    assert (summary.rows, summary.shards) == (45, 5)
    ids, matrix = read_out(tmp_path / "out")
    assert ids == ([str(r["id"]) for r in rows] if suffix == ".csv" else [r["id"] for r in rows])
    expected = embedder.embed([r["text"] for r in rows])
    assert matrix.dtype == np.float32 and matrix.shape == (45, 384)
    assert cosines(matrix, expected).min() >= 0.9999
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    meta = table.schema.metadata
    assert meta[b"embed_rerank.model"] == b"all-MiniLM-L6-v2" and meta[b"embed_rerank.dimensions"] == b"384"
    assert json.loads((tmp_path / "out" / "_corpus.json").read_text())["complete"] is True


def test_quantized_and_shortened_outputs(embedder, tmp_path):
    rows = corpus(12)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    small = LocalEmbedder(EmbedOptions(dimensions=64, embedding_type="int8"), env=hermetic_env())
    try:
        run_corpus(job(source, tmp_path / "int8"), small)
    finally:
        small.close()
    table = pq.read_table(tmp_path / "int8" / "part-00000.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.int8(), 64)
    assert table.schema.metadata[b"embed_rerank.embedding_type"] == b"int8"


def test_sparse_vectors_are_a_struct_column_as_the_service_gives_them(tmp_path):
    import checkpoints

    from runners.capabilities.queries import EmbedQuery

    splade = checkpoints.build_splade(tmp_path / "tiny-splade")
    rows = corpus(12, seed=8)
    sparse = LocalEmbedder(EmbedOptions(model=str(splade), output="sparse"), env=hermetic_env())
    try:
        run_corpus(job(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"), sparse)
        texts = [r["text"] for r in rows]
        answer = sparse._loop.call(sparse.service.embed(EmbedQuery(texts=texts, token_ids=None, outputs=("sparse",))))
    finally:
        sparse.close()
    table = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "out").glob("part-*.parquet"))])
    assert table.schema.field("embedding").type == pa.struct([("indices", pa.list_(pa.int32())),
                                                              ("values", pa.list_(pa.float32()))])
    assert table.schema.metadata[b"embed_rerank.output"] == b"sparse"
    for got, want in zip(table.column("embedding").to_pylist(), answer["data"]):
        assert got["indices"] == want["embedding"]["indices"]
        assert np.allclose(got["values"], want["embedding"]["values"], rtol=1e-4, atol=1e-6)  # other batches


def test_resume_writes_only_the_missing_shards_and_checks_the_options(embedder, tmp_path):
    rows = corpus(50)
    source, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    run_corpus(job(source, out), embedder)
    (out / "part-00001.parquet").unlink()
    (out / "part-00003.parquet").write_bytes(b"PAR1 torn")  # not a complete Parquet file: written again
    (out / ".part-00004.parquet.123.tmp").write_bytes(b"half")  # a killed run's temporary file
    kept = (out / "part-00000.parquet").stat().st_mtime_ns
    with pytest.raises(CorpusError, match="--resume continues it"):
        run_corpus(job(source, out), embedder)
    with pytest.raises(CorpusError, match="shard_rows=10"):
        run_corpus(job(source, out, shard_rows=20, resume=True), embedder)
    summary = run_corpus(job(source, out, resume=True), embedder)
    assert (summary.shards, summary.skipped) == (2, 3)
    assert (out / "part-00000.parquet").stat().st_mtime_ns == kept
    assert not list(out.glob(".*.tmp"))
    ids, _ = read_out(out)
    assert ids == [r["id"] for r in rows]


# ---- hostile input ----


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_missing_column_is_named(embedder, tmp_path, suffix):
    writer = {".jsonl": write_jsonl, ".csv": write_csv, ".parquet": write_parquet}[suffix]
    source = writer(tmp_path / f"in{suffix}", [{"id": 1, "body": "a text"}])
    with pytest.raises(CorpusError, match="'text'.*--text-column"):
        run_corpus(job(source, tmp_path / "out"), embedder)


@pytest.mark.parametrize("bad,message", [("", "is empty"), ("   ", "is empty"), (None, "is missing"),
                                         (7, "is a int, not a string")])
def test_a_bad_text_names_its_row_keeps_what_was_written_and_resume_continues(embedder, tmp_path, bad, message):
    rows = corpus(30)
    broken = [dict(r) for r in rows]
    broken[23]["text"] = bad
    source, out = write_jsonl(tmp_path / "in.jsonl", broken), tmp_path / "out"
    with pytest.raises(CorpusError, match=f"in.jsonl line 24: the text column 'text' {message}"):
        run_corpus(job(source, out), embedder)
    assert io.written_shards(out) == {0: 10, 1: 10}  # the shards before the bad row
    write_jsonl(source, rows)  # the user fixes the row
    summary = run_corpus(job(source, out, resume=True), embedder)
    assert (summary.shards, summary.skipped) == (1, 2)
    assert read_out(out)[0] == [r["id"] for r in rows]


def test_bad_ids_and_non_json_lines_are_named(embedder, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "a"}\n{"id": "two", "text": "b"}\n')
    with pytest.raises(CorpusError, match="line 2: the id 'two' is a str where the first row's is a int"):
        run_corpus(job(source, tmp_path / "a"), embedder)
    source.write_text('{"id": 1, "text": "a"}\nnot json\n')
    with pytest.raises(CorpusError, match="line 2 is not JSON"):
        run_corpus(job(source, tmp_path / "b"), embedder)
    source.write_text('{"text": "a", "id": null}\n')
    with pytest.raises(CorpusError, match="line 1: the id column 'id' is missing or empty"):
        run_corpus(job(source, tmp_path / "c"), embedder)


def test_a_file_that_is_not_what_its_extension_says(embedder, tmp_path):
    parquet = write_parquet(tmp_path / "data.parquet", corpus(3))
    disguised = tmp_path / "data.jsonl"
    disguised.write_bytes(parquet.read_bytes())
    with pytest.raises(CorpusError, match="is a Parquet file, not jsonl: rename it"):
        run_corpus(job(disguised, tmp_path / "a"), embedder)
    fake = write_jsonl(tmp_path / "fake.parquet", corpus(3))
    with pytest.raises(CorpusError, match="is not a Parquet file"):
        run_corpus(job(fake, tmp_path / "b"), embedder)
    with pytest.raises(CorpusError, match="unknown extension '.txt'"):
        run_corpus(job(write_jsonl(tmp_path / "x.txt", corpus(3)), tmp_path / "c"), embedder)
    summary = run_corpus(job(tmp_path / "x.txt", tmp_path / "d", format="jsonl"), embedder)
    assert summary.rows == 3


def test_a_shard_that_fails_to_write_is_named_and_resume_continues(embedder, tmp_path):
    rows = corpus(30)
    source, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    out.mkdir()
    (out / "part-00001.parquet").mkdir()  # something in the way of the second shard
    with pytest.raises(CorpusError, match="could not write shard .*part-00001.parquet.*--resume"):
        run_corpus(job(source, out, resume=True), embedder)
    assert 0 in io.written_shards(out)
    (out / "part-00001.parquet").rmdir()
    run_corpus(job(source, out, resume=True), embedder)
    assert read_out(out)[0] == [r["id"] for r in rows]


def test_worker_processes_share_the_shards_and_give_the_same_vectors(embedder, tmp_path):
    from runners.corpus.pool import WorkerPool

    rows = corpus(40, seed=9)
    pool = WorkerPool(EmbedOptions(), 2, env=hermetic_env())  # what --workers 2 starts: one per GPU on a GPU host
    try:
        summary = run_corpus(job(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", prefetch=4), pool)
    finally:
        pool.close()
    assert (summary.rows, summary.shards) == (40, 4)
    ids, matrix = read_out(tmp_path / "out")
    assert ids == [r["id"] for r in rows]
    assert cosines(matrix, embedder.embed([r["text"] for r in rows])).min() >= 0.9999


def test_the_command_line_reports_errors_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.jsonl"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err


# ---- interruptions: the real command, stopped half way ----


def start_command(source: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = hermetic_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))})
    return subprocess.Popen([sys.executable, "-m", "runners.corpus", str(source), str(out), "--shard-rows", "100",
                             "--no-progress", *extra], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def wait_for_shards(out: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("part-*.parquet"))) < count:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the command wrote too few shards in time"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_half_way_resume_finishes_with_every_id_once(tmp_path, sig):
    rows = corpus(2000, seed=3)
    source, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    process = start_command(source, out)
    wait_for_shards(out, 10, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    written = io.written_shards(out)
    assert len(written) < 20, "the command finished before it was interrupted"
    if sig == signal.SIGINT:
        assert process.returncode == 130 and "stopped at a shard boundary" in err, err
    else:
        assert process.returncode == -signal.SIGKILL
    process = start_command(source, out, "--resume")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    ids, matrix = read_out(out)
    assert sorted(ids) == [r["id"] for r in rows] and len(set(ids)) == len(rows)
    assert np.isfinite(matrix).all()


# ---- against running servers; the same vectors as the service ----


def test_server_mode_gives_the_service_vectors_and_survives_a_dead_server(embedder, default_server, tmp_path):
    import httpx

    from runners.corpus.client import ServerEmbedder

    rows = corpus(45, seed=5)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    dead = "http://127.0.0.1:9"  # nothing listens there: its requests are retried on the live server
    client = ServerEmbedder([dead, default_server.url], concurrency=2, request_texts=8, retries=4)
    try:
        summary = run_corpus(job(source, tmp_path / "out"), client)
    finally:
        client.close()
    assert summary.rows == 45
    ids, matrix = read_out(tmp_path / "out")
    assert ids == [r["id"] for r in rows]
    texts = [r["text"] for r in rows]
    answer = httpx.post(default_server.url + "/v1/embeddings", json={"input": texts}, timeout=60).json()
    served = np.asarray([d["embedding"] for d in answer["data"]], dtype=np.float32)
    assert cosines(matrix, served).min() >= 0.9999  # the command against the server = the server
    assert cosines(embedder.embed(texts), served).min() >= 0.9999  # in-process = the server
    meta = pq.read_table(tmp_path / "out" / "part-00000.parquet").schema.metadata
    assert meta[b"embed_rerank.model"] == answer["model"].encode() and meta[b"embed_rerank.dimensions"] == b"384"


def test_quantized_vectors_match_the_service(default_server, tmp_path):
    from runners.corpus.client import ServerEmbedder

    texts = [r["text"] for r in corpus(20, seed=6)]
    options = EmbedOptions(embedding_type="int8", dimensions=128)
    client = ServerEmbedder([default_server.url], options)
    local = LocalEmbedder(options, env=hermetic_env())
    try:
        remote, here = client.embed(texts), local.embed(texts)
    finally:
        client.close()
        local.close()
    assert remote.dtype == here.dtype == np.int8 and remote.shape == here.shape == (20, 128)
    assert np.abs(remote.astype(int) - here.astype(int)).max() <= 1


def test_a_server_refusal_stops_the_run_with_its_message(default_server, tmp_path):
    from runners.corpus.client import ServerEmbedder

    client = ServerEmbedder([default_server.url], EmbedOptions(dimensions=5000))
    try:
        with pytest.raises(CorpusError, match="refused texts 0-2 of the shard with 4.*dimensions"):
            run_corpus(job(write_jsonl(tmp_path / "in.jsonl", corpus(3)), tmp_path / "out"), client)
    finally:
        client.close()


# ---- Ray Data (the `ray` extra) ----


@pytest.fixture(scope="module")
def ray_local() -> Iterator:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # Workers inherit this process's environment (PYTHONPATH included); the hub stays offline in them too.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "CACHE_MB": "0"}})
    yield ray
    ray.shutdown()


def test_the_ray_stage_and_ray_command_give_the_command_output(embedder, ray_local, tmp_path):
    from ray.data import ActorPoolStrategy

    from runners.corpus.ray_stage import EmbedBatches

    rows = corpus(40, seed=7)
    source = write_parquet(tmp_path / "in.parquet", rows)
    run_corpus(job(source, tmp_path / "command"), embedder)
    ids, expected = read_out(tmp_path / "command")

    ds = ray_local.data.read_parquet(str(source))
    out = ds.map_batches(EmbedBatches, batch_format="pyarrow", batch_size=16,
                         compute=ActorPoolStrategy(size=1), num_cpus=1).take_all()
    by_id = {r["id"]: np.asarray(r["embedding"], dtype=np.float32) for r in out}
    assert sorted(by_id) == ids
    assert cosines(np.stack([by_id[i] for i in ids]), expected).min() >= 0.9999

    from runners.corpus.ray_stage import run_ray

    summary = run_ray(job(source, tmp_path / "ray", shard_rows=20))
    assert summary.rows == 40
    table = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "ray").glob("*.parquet"))])
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    got = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))
    assert cosines(np.asarray([got[i] for i in ids], dtype=np.float32), expected).min() >= 0.9999
