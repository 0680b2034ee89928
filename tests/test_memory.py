"""Flat memory: the allocator setting, its preload into every launch path, and a short soak."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import httpx
import pytest
from conftest import BENTOML

from load_tests.processes import ROOT, free_port, hermetic_env
from load_tests.soak import TextSource, soak
from runners import allocator
from runners.allocator import Allocator, activate, choose, is_mapped, mapped, preload
from runners.settings import SettingsError, load_settings

PYTHON = sys.executable


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", allocator.CHOSEN_ENV, "EMBED_RERANK_ALLOCATOR_REEXEC", "ALLOCATOR")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


# ---- choice and preload ----


@pytest.mark.parametrize(("jemalloc", "mimalloc", "expected"), [
    ("/usr/lib/x/libjemalloc.so.2", "/site/libmimalloc.so.3", ("jemalloc", "/usr/lib/x/libjemalloc.so.2")),
    (None, "/site/libmimalloc.so.3", ("mimalloc", "/site/libmimalloc.so.3")),
    (None, None, ("system", None)),
])
def test_auto_prefers_jemalloc_then_mimalloc_then_system(monkeypatch, jemalloc, mimalloc, expected):
    monkeypatch.setattr(allocator, "jemalloc_path", lambda: jemalloc)
    monkeypatch.setattr(allocator, "mimalloc_path", lambda: mimalloc)
    chosen = choose("auto")
    assert (chosen.name, chosen.path) == expected
    assert allocator.library_path("auto") == expected[1]
    assert choose("system") == Allocator("system", None, "system")


def test_explicit_allocator_that_is_missing_fails_with_how_to_install(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc_path", lambda: None)
    with pytest.raises(SettingsError, match=r"ALLOCATOR=jemalloc .*apt-get install libjemalloc2") as err:
        choose("jemalloc")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["tcmalloc", "glibc", "je malloc"])
def test_bad_allocator_value_names_the_variable(value):
    for check in (lambda: load_settings({"ALLOCATOR": value}), lambda: allocator.requested({"ALLOCATOR": value})):
        with pytest.raises(SettingsError, match=r"^ALLOCATOR has .*not one of: auto, jemalloc, mimalloc, system$"):
            check()
    assert load_settings({"ALLOCATOR": " JEMALLOC "}).allocator == "jemalloc"
    assert load_settings({}).allocator == allocator.requested({}) == "auto"


def test_mimalloc_comes_from_the_installed_wheel():
    path = allocator.mimalloc_path()
    assert path and path.endswith("cmeel.prefix/lib/libmimalloc.so.3") and os.path.isfile(path)
    assert choose("mimalloc").path == path


def test_jemalloc_is_found_in_the_multiarch_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator.sysconfig, "get_config_var", lambda name: None)
    for machine, triple in (("x86_64", "x86_64-linux-gnu"), ("aarch64", "aarch64-linux-gnu"), ("arm64", "aarch64-linux-gnu")):
        monkeypatch.setattr(allocator.platform, "machine", lambda m=machine: m)
        assert allocator._multiarch_dirs()[0] == f"/usr/lib/{triple}"
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    monkeypatch.setattr(allocator, "_multiarch_dirs", lambda: ["/no/such/dir", str(tmp_path)])
    assert allocator.jemalloc_path() == str(tmp_path / "libjemalloc.so.2")


def test_preload_prepends_keeps_what_is_there_and_is_idempotent(tmp_path):
    lib = tmp_path / "libmimalloc.so.3"
    lib.write_bytes(b"")
    chosen = Allocator("mimalloc", str(lib), "auto")
    env = {"LD_PRELOAD": "/opt/libfoo.so /opt/libbar.so"}
    assert preload(chosen, env) is False
    assert env["LD_PRELOAD"] == f"{lib}:/opt/libfoo.so:/opt/libbar.so"
    assert preload(chosen, env) is True
    assert env["LD_PRELOAD"] == f"{lib}:/opt/libfoo.so:/opt/libbar.so"
    (tmp_path / "link.so").symlink_to(lib)  # the same file under another name counts as listed
    assert preload(chosen, {"LD_PRELOAD": str(tmp_path / "link.so")}) is True
    empty: dict[str, str] = {}
    preload(chosen, empty)
    assert empty["LD_PRELOAD"] == str(lib) and empty[allocator.CHOSEN_ENV] == "mimalloc"
    system: dict[str, str] = {"LD_PRELOAD": "/opt/libfoo.so"}
    preload(Allocator("system", None, "system"), system)
    assert system["LD_PRELOAD"] == "/opt/libfoo.so"


def test_missing_allocator_warns_once_per_process_tree(monkeypatch, caplog):
    monkeypatch.setattr(allocator, "jemalloc_path", lambda: None)
    monkeypatch.setattr(allocator, "mimalloc_path", lambda: None)
    env: dict[str, str] = {}
    with caplog.at_level(logging.INFO, logger="embed_rerank.allocator"):
        activate("auto", env)
        activate("auto", dict(env))  # a child process inherits the parent's environment
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "apt-get install libjemalloc2" in warnings[0] and "cmeel-mimalloc" in warnings[0]
    assert "ALLOCATOR=system" in warnings[0]


def test_mapped_reads_the_process_maps():
    path = choose("mimalloc").path
    code = "from runners.allocator import mapped, is_mapped; import sys; print(mapped(), is_mapped(sys.argv[1]))"
    on = subprocess.run([PYTHON, "-c", code, path], env=_clean_env(LD_PRELOAD=path), capture_output=True, text=True)
    assert on.stdout.strip() == f"('mimalloc', '{path}') True", on.stderr
    off = subprocess.run([PYTHON, "-c", code, path], env=_clean_env(), capture_output=True, text=True)
    assert off.stdout.strip() == "None False", off.stderr
    assert mapped(2**22 + 12345) is None and not is_mapped(path, 2**22 + 12345)  # no such process


# ---- launch paths ----


def test_runpod_worker_reexecutes_itself_once_with_the_allocator():
    code = ("import os; from runpod_adapter.__main__ import preload_allocator; print('start', os.getpid(), flush=True); "
            "preload_allocator(); from runners.allocator import mapped; print('end', os.getpid(), (mapped() or ['system'])[0])")
    done = subprocess.run([PYTHON, "-c", code], env=_clean_env(ALLOCATOR="mimalloc"), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    lines = done.stdout.split()
    # Two starts (the re-exec keeps the pid), one end, with mimalloc mapped.
    assert lines.count("start") == 2 and lines[-3:] == ["end", lines[1], "mimalloc"], done.stdout + done.stderr
    # The marker of a re-executed process stops a second re-exec, even when the preload did not take.
    guarded = subprocess.run([PYTHON, "-c", code], env=_clean_env(ALLOCATOR="mimalloc", EMBED_RERANK_ALLOCATOR_REEXEC="1"),
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = guarded.stdout.split()
    assert lines.count("start") == 1 and lines[-1] == "system", guarded.stdout + guarded.stderr


def test_bad_allocator_stops_bentoml_serve_with_one_line():
    proc = subprocess.run([BENTOML, "serve", "service:EmbeddingService", "--port", str(free_port())], cwd=ROOT,
                          env=hermetic_env({"ALLOCATOR": "tcmalloc"}), capture_output=True, text=True, timeout=90)
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert last == "configuration error: ALLOCATOR has 'tcmalloc', which is not one of: auto, jemalloc, mimalloc, system"


SOAK_CACHE_MB = 2  # small enough for the short soak's ever-new texts to fill it: the bound is tested too


@pytest.fixture(scope="module")
def auto_server(start_server):
    """`bentoml serve` with ALLOCATOR=auto and nothing preloaded from outside."""
    return start_server({"ALLOCATOR": "auto", "LD_PRELOAD": "", allocator.CHOSEN_ENV: "",
                         "CACHE_MB": str(SOAK_CACHE_MB)})


def _workers(server) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]


def test_bentoml_workers_run_on_the_allocator(auto_server):
    expected = choose("auto")
    assert expected.path, "no allocator installed here: cmeel-mimalloc is a dependency of the project"
    workers = _workers(auto_server)
    assert workers
    for pid in workers:
        assert is_mapped(expected.path, pid), f"worker {pid} does not have {expected.path} mapped"
    assert not is_mapped(expected.path, auto_server.proc.pid)  # the serving process started before the preload
    assert f"allocator: {expected.describe()}" in auto_server.log()


def test_short_soak_keeps_memory_flat(auto_server):
    # Texts of at most 60 words: more forward passes (and shapes) per second on a busy 2-core machine.
    report = asyncio.run(soak(auto_server.url, auto_server.proc.pid, duration=36, connections=8, warmup=10, seed=7,
                              max_words=60))
    assert report["requests_failed"] == 0 and report["requests_ok"] >= 5, report["errors"]
    assert set(report["allocator"].values()) == {choose("auto").name}
    assert report["growth_pct"] <= 25, {k: v for k, v in report.items() if k != "samples"}
    # The cache of repeated inputs filled up with the soak's texts and stayed within CACHE_MB.
    cache = {line.split()[0]: float(line.split()[1]) for line in httpx.get(auto_server.url + "/metrics").text.splitlines()
             if line.startswith(("embed_rerank_cache_bytes ", "embed_rerank_cache_entries "))}
    assert SOAK_CACHE_MB * 0.8 * 2**20 <= cache["embed_rerank_cache_bytes"] <= SOAK_CACHE_MB * 2**20, cache


def test_soak_texts_never_repeat():
    source = TextSource(seed=1)
    texts = [source.text() for _ in range(500)]
    assert len(set(texts)) == 500
    assert all(5 <= len(t.split()) <= 200 for t in texts)
    short = TextSource(seed=2, max_words=20)
    assert all(5 <= len(short.text().split()) <= 20 for _ in range(50))
    kinds = {source.request()[0] for _ in range(50)}
    assert kinds == {"embed", "rerank"}
