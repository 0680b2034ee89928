"""Which malloc the model process runs on, preloaded with `LD_PRELOAD` (`ALLOCATOR`).

glibc's malloc fragments under ever-changing tensor shapes: a worker grew 641 MB → 1.9 GB in
5 minutes of mixed traffic, where jemalloc held ~740 MB and mimalloc 747 → 769 MB (docs/performance.md,
Memory). A preload only acts on processes started after it is set, so `preload` puts the
library into `os.environ` and each launch path starts its model process with that environment:
`bentoml serve`'s worker processes inherit the serving process's environment (service.py calls
`activate` at import, before BentoML spawns them); `python -m runpod_adapter` re-executes itself.

- `auto`: Debian's `libjemalloc2` if installed, else mimalloc from the `cmeel-mimalloc` wheel,
  else the system malloc (with one warning that says how to get one);
- `jemalloc`, `mimalloc`: that one, or a start that fails with one line saying how to install it;
- `system`: nothing is preloaded.
"""

from __future__ import annotations

import glob
import logging
import os
import platform
import re
import sysconfig
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from runners.settings import ALLOCATORS, SettingsError, parse_allocator

JEMALLOC_SONAME = "libjemalloc.so.2"
MIMALLOC_DIST = "cmeel-mimalloc"
# Set by `preload` in the environment it changes: a child process that finds it knows its parent
# already chose (and warned), so a missing allocator is reported once per process tree.
CHOSEN_ENV = "EMBED_RERANK_ALLOCATOR"
_KNOWN = {"jemalloc": re.compile(r"libjemalloc\.so"), "mimalloc": re.compile(r"libmimalloc\.so"),
          "tcmalloc": re.compile(r"libtcmalloc(_minimal)?\.so")}
INSTALL_HINT = ("install one: `apt-get install libjemalloc2` (Debian/Ubuntu) or "
                f"`pip install {MIMALLOC_DIST}==3.4.3`, or set ALLOCATOR=system to keep glibc's malloc")

log = logging.getLogger("embed_rerank.allocator")


@dataclass(frozen=True)
class Allocator:
    """The allocator chosen for the model process: `path` is None for the system malloc."""

    name: str
    path: str | None
    requested: str

    def describe(self) -> str:
        return f"{self.name} ({self.path})" if self.path else "system malloc (glibc)"


def requested(env: Mapping[str, str] | None = None) -> str:
    """The validated `ALLOCATOR` value (`auto` when unset), as `load_settings` reads it."""
    env = os.environ if env is None else env
    return parse_allocator(env.get("ALLOCATOR", ""))


def _multiarch_dirs() -> list[str]:
    """Debian's multiarch library folders for this machine, most specific first."""
    triples = [sysconfig.get_config_var("MULTIARCH") or ""]
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    triples.append(f"{machine}-linux-gnu")
    dirs = [f"/usr/lib/{t}" for t in triples if t]
    # Any other *-linux-gnu folder last (a multiarch triple that neither guess spelled).
    dirs += sorted(glob.glob("/usr/lib/*-linux-gnu"))
    return list(dict.fromkeys(dirs + ["/usr/lib64", "/usr/lib", "/usr/local/lib"]))


def jemalloc_path() -> str | None:
    """The system's `libjemalloc.so.2` (Debian/Ubuntu package libjemalloc2), or None."""
    for folder in _multiarch_dirs():
        candidate = Path(folder) / JEMALLOC_SONAME
        if candidate.is_file():
            return str(candidate)
    return None


def mimalloc_path() -> str | None:
    """`libmimalloc.so.<major>` as installed by the `cmeel-mimalloc` wheel, or None."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(MIMALLOC_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        # The soname (libmimalloc.so.3), not the dev symlink or the fully versioned file.
        if re.fullmatch(r"libmimalloc\.so\.\d+", entry.name):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return str(path.resolve())
    return None


def choose(setting: str) -> Allocator:
    """Resolve `ALLOCATOR` to a library; an explicit choice that is not installed is a `SettingsError`."""
    if setting not in ALLOCATORS:
        raise SettingsError(f"ALLOCATOR has {setting!r}, which is not one of: {', '.join(ALLOCATORS)}")
    if setting == "system":
        return Allocator("system", None, setting)
    found = {"jemalloc": jemalloc_path, "mimalloc": mimalloc_path}
    if setting != "auto":
        path = found[setting]()
        if path is None:
            how = ("`apt-get install libjemalloc2`" if setting == "jemalloc"
                   else f"`pip install {MIMALLOC_DIST}==3.4.3`")
            raise SettingsError(f"ALLOCATOR={setting} but {setting} is not installed: install it with {how}, "
                                "or set ALLOCATOR=auto to take whichever allocator is installed")
        return Allocator(setting, path, setting)
    for name in ("jemalloc", "mimalloc"):
        path = found[name]()
        if path:
            return Allocator(name, path, setting)
    return Allocator("system", None, setting)


def library_path(setting: str) -> str | None:
    """The library to preload for `ALLOCATOR=setting`, or None for the system malloc."""
    return choose(setting).path


def _preload_entries(value: str) -> list[str]:
    # ld.so separates LD_PRELOAD entries by spaces or colons.
    return [part for part in re.split(r"[:\s]+", value) if part]


def preload(allocator: Allocator, env: MutableMapping[str, str] | None = None) -> bool:
    """Prepend the allocator to `LD_PRELOAD` in `env` (os.environ), keeping what is there.

    Idempotent. Returns whether the library was already listed. Only processes started after this
    (with this environment) load it.
    """
    env = os.environ if env is None else env
    env[CHOSEN_ENV] = allocator.name
    if allocator.path is None:
        return False
    entries = _preload_entries(env.get("LD_PRELOAD", ""))
    real = os.path.realpath(allocator.path)
    if any(os.path.realpath(entry) == real for entry in entries):
        return True
    env["LD_PRELOAD"] = ":".join([allocator.path, *entries])
    return False


def mapped(pid: int | str = "self") -> tuple[str, str] | None:
    """(name, path) of a malloc replacement mapped into process `pid`, from /proc/<pid>/maps."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6:
                    continue
                path = fields[5].strip()
                base = os.path.basename(path)
                for name, pattern in _KNOWN.items():
                    if pattern.match(base):
                        return name, path
    except OSError:
        return None
    return None


def is_mapped(path: str, pid: int | str = "self") -> bool:
    """Whether the library at `path` is mapped into process `pid`."""
    real = os.path.realpath(path)
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return any(line.rstrip().endswith(" " + real) for line in maps)
    except OSError:
        return False


def activate(setting: str, env: MutableMapping[str, str] | None = None) -> Allocator:
    """Choose the allocator, preload it for the processes started from here, and log once
    which allocator this process runs on."""
    env = os.environ if env is None else env
    inherited = bool(env.get(CHOSEN_ENV))
    allocator = choose(setting)
    was_listed = preload(allocator, env)
    here = mapped()
    if allocator.path is None:
        if here:
            log.info("allocator: %s (%s), preloaded from outside (LD_PRELOAD); ALLOCATOR=%s", here[0], here[1], setting)
        elif not inherited and setting == "auto":
            log.warning("allocator: system malloc (glibc), no jemalloc or mimalloc found: memory grows under "
                        "mixed traffic; %s", INSTALL_HINT)
        elif not inherited:
            log.info("allocator: system malloc (glibc), as ALLOCATOR=system asks")
    elif is_mapped(allocator.path):
        log.info("allocator: %s", allocator.describe())
    elif was_listed:
        log.warning("allocator: %s is in LD_PRELOAD but not loaded in this process (the dynamic loader "
                    "refused it; its message is above): fix or reinstall the library, or set ALLOCATOR=system",
                    allocator.describe())
    else:
        # The serving process itself started before the preload; its children load it.
        log.debug("allocator: %s preloaded for the processes started from here", allocator.describe())
    return allocator
