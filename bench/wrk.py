"""Debian's `wrk` as bench.run's light load generator: find or install it, feed it JSON bodies, read its numbers.

wrk is C with LuaJIT scripts: at a few thousand requests per second it costs a small share of one core,
where the benchmark's httpx client costs ~2.4 ms of CPU per request (FIELD_NOTES, "Load generators").
Each request posts the next line of a bodies file (one JSON body a line, cycled), prepared once per
wrk thread in `init`; `done` prints the run's numbers as one JSON line, which `parse_output` reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BUNDLED = ROOT / ".gpu_bundle" / "wrk"  # bench/gpu_prepare.py: bin/wrk and its libraries in lib/
MARKER = "WRK_JSON "
PERCENTILES = (50, 90, 99, 99.9)

LUA_SCRIPT = r"""
-- Written by bench/wrk.py. Arguments after "--": the file of request bodies, one JSON body a line.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local requests = {}
local next_index = 0
local threads = 0

function setup(thread)
  -- runs in the main Lua state, once per thread, just before that thread's init
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      requests[#requests + 1] = wrk.format(nil, nil, nil, line)
    end
  end
  next_index = ((thread_number or 1) - 1) * 7919 % #requests  -- threads start at different bodies
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function done(summary, latency, requests_stats)
  local e = summary.errors
  local p = {}
  for _, q in ipairs({%PERCENTILES%}) do
    p[#p + 1] = string.format('"%g": %d', q, latency:percentile(q))
  end
  io.write(string.format(
    '%MARKER%{"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "mean": %.1f, "max": %d, "stdev": %.1f, "percentiles": {%s}}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev, table.concat(p, ", ")))
end
"""


@dataclass
class Wrk:
    """A runnable wrk: its path and the environment it needs (LD_LIBRARY_PATH for a carried copy)."""

    path: str
    env: dict[str, str] = field(default_factory=dict)
    source: str = "PATH"

    def version(self) -> str | None:
        """wrk's version line, or None when it does not run here (a missing library, an old glibc)."""
        try:
            proc = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=10,
                                  env={**os.environ, **self.env})
        except (OSError, subprocess.SubprocessError):
            return None
        line = (proc.stdout or proc.stderr).splitlines()[0] if (proc.stdout or proc.stderr) else ""
        # wrk --version exits 1 after its usage text
        return line.split(" Copyright")[0].strip() if line.startswith("wrk ") else None


def lua_script() -> str:
    return (LUA_SCRIPT.replace("%PERCENTILES%", ", ".join(f"{p:g}" for p in PERCENTILES))
            .replace("%MARKER%", MARKER))


def candidates(explicit: str | None = None) -> list[Wrk]:
    found: list[Wrk] = []
    if explicit:
        found.append(Wrk(explicit, source="--wrk"))
    on_path = shutil.which("wrk")
    if on_path:
        found.append(Wrk(on_path, source="PATH"))
    if (BUNDLED / "bin" / "wrk").is_file():
        lib = str(BUNDLED / "lib")
        env = {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, [lib, os.environ.get("LD_LIBRARY_PATH", "")]))}
        found.append(Wrk(str(BUNDLED / "bin" / "wrk"), env, source=".gpu_bundle/wrk"))
    return found


def apt_install() -> str:
    """Install Debian's wrk as root; '' when done, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("apt-get"):
        return "no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "wrk"]):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{' '.join(argv)}: {exc}"
        if argv[1] == "install" and proc.returncode == 0:
            return ""
    return f"apt-get install wrk failed: {(proc.stderr or proc.stdout).strip()[-300:]}"


def find_wrk(explicit: str | None = None, install: bool = True) -> tuple[Wrk | None, str]:
    """(a wrk that runs, '') or (None, why not): an explicit path, PATH, the GPU bundle, then apt-get as root."""
    tried = []
    for wrk in candidates(explicit):
        if wrk.version():
            return wrk, ""
        tried.append(f"{wrk.path} does not run")
    if install:
        why = apt_install()
        if not why and shutil.which("wrk"):
            wrk = Wrk(shutil.which("wrk") or "wrk", source="apt-get install wrk")
            if wrk.version():
                return wrk, ""
        tried.append(why or "installed wrk does not run")
    else:
        tried.append("not installed")
    return None, "wrk is not available (" + "; ".join(tried) + "): `apt-get install wrk` as root, or pass --wrk PATH"


def write_inputs(folder: Path, name: str, bodies: list[dict[str, Any]]) -> tuple[Path, Path]:
    """(Lua script, bodies file) for one target under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "wrk_bodies.lua"
    script.write_text(lua_script())
    bodies_path = folder / f"wrk_bodies_{name}.jsonl"
    bodies_path.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    return script, bodies_path


def parse_output(text: str) -> dict[str, Any]:
    """The JSON line `done` printed, in friendlier units: req/s, latency in ms, errors summed."""
    for line in reversed(text.splitlines()):
        if line.startswith(MARKER):
            raw = json.loads(line[len(MARKER):])
            break
    else:
        raise ValueError(f"no {MARKER.strip()} line in wrk's output:\n{text[-2000:]}")
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    done = raw["requests"] > 0  # with no answer, wrk's histogram reads 0: no latency, not a fast one
    pct = {float(k): v / 1000 for k, v in lat["percentiles"].items()} if done else {}
    errors = sum(raw["errors"].values())
    # wrk counts error statuses as completed requests: a fast 404 must not pass for throughput
    ok = raw["requests"] - raw["errors"]["status"]
    return {
        "requests_per_s": ok / seconds if seconds > 0 else 0.0,
        "responses_per_s": raw["requests"] / seconds if seconds > 0 else 0.0,
        "p50_ms": pct.get(50.0),
        "p90_ms": pct.get(90.0),
        "p99_ms": pct.get(99.0),
        "p999_ms": pct.get(99.9),
        "mean_ms": lat["mean"] / 1000 if done else None,
        "max_ms": lat["max"] / 1000 if done else None,
        "requests": raw["requests"],
        "seconds": seconds,
        "errors": errors,
        "errors_by_kind": {k: v for k, v in raw["errors"].items() if v},
    }


def run(wrk: Wrk, url: str, script: Path, bodies: Path, connections: int, seconds: float,
        threads: int = 1, timeout_s: float = 10.0) -> dict[str, Any]:
    """One wrk run against `url` (the full route): `connections` keep-alive connections for `seconds` (whole)."""
    argv = [wrk.path, "-t", str(max(1, min(threads, connections))), "-c", str(connections),
            "-d", f"{max(1, round(seconds))}s", "--timeout", f"{max(1, round(timeout_s))}s",
            "-s", str(script), url, "--", str(bodies)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30,
                          env={**os.environ, **wrk.env})
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {proc.stderr.strip()[-1000:]}")
    return parse_output(proc.stdout)
