"""The RunPod batch job: `{"batch": {"input_url", "output_url", "error_url"?, "endpoint"}}`.

The input JSONL is read from `input_url` into the job store (DATA_DIR; on RunPod the network volume
when DATA_DIR is unset and one is mounted), run by the same runner as the server's Batch API
(runners.jobs.runner: the routes' own handlers, chunks committed), and the output and error files
are written with HTTP PUT to `output_url` and `error_url` (presigned S3 URLs, or any HTTP server).
Progress goes to RunPod with `progress_update` after each commit. The batch is named after the job,
so when RunPod retries a job that a dead worker left unfinished, it resumes from the last commit.

The URLs follow the image URLs' rules (runners.capabilities.image_urls): off unless
BATCH_URLS=allow, hosts from BATCH_URL_HOSTS, no private address unless its host is listed by its
exact name or address (a bucket on the cluster's own network), redirects only within the list.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any

from runners.capabilities.image_urls import Address, ImageFetcher, split_host_port
from runners.errors import BadRequest, PayloadTooLarge, ServiceError
from runners.jobs import wire
from runners.jobs.runner import BatchRunner, new_batch_state
from runners.jobs.store import JobStore

log = logging.getLogger("embed_rerank.runpod")

BATCH_JOB_SHAPE = '{"batch": {"input_url": ..., "output_url": ..., "error_url"?: ..., "endpoint": "/v1/embeddings"}}'
TRANSFER_TIMEOUT_S = 600.0
VOLUME_DATA = "embed-rerank-data"


class BatchURLs(ImageFetcher):
    """Batch files in and out under BATCH_URL_HOSTS (see the module docstring)."""

    hosts_setting = "BATCH_URL_HOSTS"
    code_word = "batch_url"
    instead = "use a URL on a listed host"
    accept = "*/*"

    def __init__(self, hosts: tuple[str, ...]) -> None:
        super().__init__(hosts, TRANSFER_TIMEOUT_S, wire.MAX_FILE_BYTES, concurrency=4)
        self.named = {split_host_port(h)[0] for h in hosts if "*" not in h}

    async def _resolve(self, host: str, port: int) -> Address:
        if host.strip("[]") in self.named:  # listed by name or address: the operator allows where it points
            try:
                return ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                addresses = await self.lookups.addresses(host, port)
                if addresses:
                    return ipaddress.ip_address(addresses[0].split("%")[0])
        return await super()._resolve(host, port)

    def failed(self, url: str, where: str, reason: str) -> BadRequest:
        log.info("batch URL %s not reached: %s", url[:120], reason)
        return BadRequest(f"{where}: {url[:120]} could not be reached: check that it answers 200 (GET) or 2xx (PUT) "
                          f"from a public address (or a host BATCH_URL_HOSTS names exactly) within "
                          f"{self.timeout_s:g}s", param=where, code="batch_url_failed")

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the input file is over {wire.MAX_FILE_BYTES // (1024 * 1024)} MB, the limit of a "
                               "batch input file: split it into several jobs", code="file_too_large")

    async def put(self, url: str, path: Path, where: str) -> None:
        """PUT the file's bytes to `url` (no redirects: a presigned URL answers where it is)."""
        import httpx

        scheme, host, port = self._check(url, where)
        try:
            address = await self._resolve(host, port)
        except Exception as exc:  # noqa: BLE001 - one error for every failure past the host list
            raise self.failed(url, where, str(exc)) from None
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        literal = f"[{address}]" if address.version == 6 else str(address)
        pinned = parts._replace(scheme=scheme, netloc=f"{literal}:{port}").geturl()
        size = path.stat().st_size
        headers = {"Host": host if port in (80, 443) else f"{host}:{port}", "Content-Length": str(size),
                   "Content-Type": "application/jsonl"}

        async def chunks() -> Any:
            with open(path, "rb") as f:
                while chunk := await asyncio.to_thread(f.read, 1 << 20):
                    yield chunk

        try:
            async with httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                         timeout=httpx.Timeout(self.timeout_s)) as client:
                answer = await client.put(pinned, content=chunks(), headers=headers,
                                          extensions={"sni_hostname": host} if scheme == "https" else {})
        except httpx.HTTPError as exc:
            raise self.failed(url, where, f"{type(exc).__name__}: {exc}") from None
        if not 200 <= answer.status_code < 300:
            raise self.failed(url, where, f"HTTP {answer.status_code}")


def data_dir(settings: Any, env: dict[str, str] | None = None) -> Path:
    """DATA_DIR; unset on RunPod with a network volume mounted, a folder on the volume (jobs resume there)."""
    env = dict(os.environ) if env is None else env
    volume = Path(env.get("RUNPOD_VOLUME_PATH", "").strip() or "/runpod-volume")
    if not env.get("DATA_DIR", "").strip() and volume.is_dir():
        return volume / VOLUME_DATA
    return settings.data_dir


def parse_spec(spec: Any) -> dict[str, str]:
    if not isinstance(spec, dict):
        raise BadRequest(f"batch must be an object: send {BATCH_JOB_SHAPE}", param="batch")
    for key in ("input_url", "output_url"):
        if not isinstance(spec.get(key), str):
            raise BadRequest(f"batch.{key} is missing: send {BATCH_JOB_SHAPE}", param=f"batch.{key}")
    if spec.get("error_url") is not None and not isinstance(spec["error_url"], str):
        raise BadRequest("batch.error_url must be a URL string", param="batch.error_url")
    endpoint = spec.get("endpoint", "/v1/embeddings")
    if endpoint not in wire.ENDPOINTS:
        raise BadRequest(f"batch.endpoint {str(endpoint)[:80]!r} cannot run as a batch: use one of "
                         f"{', '.join(wire.ENDPOINTS)}", param="batch.endpoint")
    return {"input_url": spec["input_url"], "output_url": spec["output_url"], "error_url": spec.get("error_url") or "",
            "endpoint": endpoint}


def batch_id_of(job_id: str) -> str:
    """The job's batch: the same id when RunPod retries the job."""
    return "batch_rp" + (re.sub(r"[^A-Za-z0-9]", "", job_id)[:80] or "job")


def report(job: dict[str, Any], batch: dict[str, Any]) -> None:
    """Progress to RunPod (on RunPod only: the local test server has nowhere to send it)."""
    counts = batch.get("request_counts") or {}
    progress = {"batch_id": batch["id"], "status": batch["status"], **counts}
    if not os.environ.get("RUNPOD_POD_ID"):
        log.debug("job %s progress: %s", job.get("id"), progress)
        return
    from runpod.serverless import progress_update

    progress_update(job, progress)


def check_job(spec_input: Any, settings: Any) -> tuple[dict[str, str], BatchURLs]:
    """The job's fields and URLs, checked before a model is started or anything is read."""
    spec = parse_spec(spec_input)
    if not settings.batch_urls:
        raise BadRequest("batch jobs read and write URLs, which this worker does not: set BATCH_URLS=allow and "
                         "BATCH_URL_HOSTS to the hosts of your input and output URLs", param="batch.input_url",
                         code="batch_urls_off")
    urls = BatchURLs(settings.batch_url_hosts)
    for key in ("input_url", "output_url", "error_url"):
        if spec[key]:
            urls._check(spec[key], f"batch.{key}")
    return spec, urls


async def run_batch_job(job: dict[str, Any], spec_input: Any, settings: Any) -> dict[str, Any]:
    """Run a batch job to its end; the batch object with the URLs written, or an error (raised)."""
    from runners.api import batches, routes

    spec, urls = check_job(spec_input, settings)
    store = JobStore(data_dir(settings))
    store.prepare()
    runner = BatchRunner(store, batches.call_line)
    batches.bind(store, None, routes.line_routes())
    batch_id = batch_id_of(str(job.get("id") or ""))
    try:
        state: dict[str, Any] | None = store.batch(batch_id)
    except ServiceError:
        state = None
    if state is not None:
        log.info("job %s: resuming batch %s (%s, %d lines committed)", job.get("id"), batch_id, state["status"],
                 state.get("next_line", 0))
    else:
        data = await urls.fetch(spec["input_url"], "batch.input_url")
        meta = await asyncio.to_thread(store.save_upload, io.BytesIO(data), "input.jsonl", wire.PURPOSE,
                                       wire.DEFAULT_FILE_EXPIRY_S)
        del data
        others = [u for u in meta["urls"] if u != spec["endpoint"]]
        if others:
            raise BadRequest(f"the input has requests for {', '.join(others)}, not only for batch.endpoint "
                             f"{spec['endpoint']}: a batch runs one endpoint", param="batch.endpoint")
        state = new_batch_state(meta["id"], spec["endpoint"], "24h", {"runpod_job": str(job.get("id"))})
        state["id"] = batch_id
        store.create_batch(state)
    final = await runner.run_batch(batch_id, progress=lambda batch: report(job, batch))
    if final["status"] == wire.FAILED:
        errors = (final.get("errors") or {}).get("data") or [{"message": "the batch failed"}]
        raise BadRequest(f"batch {batch_id} failed: {errors[0]['message']}", param="batch.input_url",
                         code=errors[0].get("code") or "batch_failed")
    folder = store.batch_dir(batch_id)
    for name in ("output.jsonl", "errors.jsonl"):
        (folder / name).touch(exist_ok=True)
    await urls.put(spec["output_url"], folder / "output.jsonl", "batch.output_url")
    if spec["error_url"]:
        await urls.put(spec["error_url"], folder / "errors.jsonl", "batch.error_url")
    return {**wire.batch_object(final), "output_url": spec["output_url"].split("?")[0],
            "error_url": spec["error_url"].split("?")[0] or None}
