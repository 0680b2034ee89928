"""Models on the RunPod network volume, decided before the service reads its settings.

The image bakes its models into `BAKED_MODELS_DIR` (default `/models`), one folder each. When the
network volume is mounted (`RUNPOD_VOLUME_PATH`, default `/runpod-volume`), every baked folder that
`MODEL_NAMES` uses is copied once to `<volume>/models/<folder>` and loaded from there afterwards:

- the copy is atomic: it is written into a temporary folder in the same directory of the volume,
  finished with a marker file, then renamed into place; a folder without a marker (an interrupted
  copy, or another tool's) is never loaded, and is replaced;
- a temporary folder left by an interrupted copy is removed once nothing has written to it for
  `STALE_AFTER_S` seconds (several workers may share one volume and copy at the same time: each
  copies into its own temporary folder, and the first rename wins);
- the copy is checked before every use against the image: the SHA-256 of every file of the baked
  folder (its manifest, `MANIFEST`, written at bake time into the image, or computed from the baked
  folder when the image has none) is kept in the copy's marker, and each start hashes every file of
  the copy (code, configs, tokenizer files and weights alike); a changed, extra or missing file, or
  a marker that differs from the image's manifest, removes the copy and copies it again (the log
  names the file). An image with another model revision has another manifest, so it copies again.

`MODEL_NAMES` entries that name a baked model (its folder path, or the hub id it was baked from)
are rewritten to the folder that will be loaded, and `SERVED_MODEL_NAMES` keeps the names they
would have had, so clients see the same model names with or without a volume. A hub id that is
neither baked nor on the volume downloads into `<volume>/huggingface` (`HF_HOME`). A complete copy on
the volume that this image did not bake (found by the hub id in its marker) cannot be checked against
the image: it is used only when its files match its own marker and it holds no Python file; otherwise
the model is downloaded by its hub id, like any other named model.

This module only uses the standard library at import time: the image's model stage runs it
(`python volume.py bake …`) before the project is installed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("embed_rerank.runpod.volume")

DEFAULT_VOLUME_PATH = "/runpod-volume"
DEFAULT_BAKED_DIR = "/models"
MARKER = ".embed-rerank-complete"  # written last into a finished copy (JSON)
SOURCE_FILE = ".embed-rerank-source"  # written at bake time: {"repo_id", "revision"}
MANIFEST = ".embed-rerank-manifest.json"  # written at bake time: SHA-256 and size of every file
PARTIAL = ".partial-"
OLD = ".old-"
STALE_AFTER_S = 600.0
_SKIP = {MARKER, MANIFEST, ".cache"}
_TRUE = ("1", "true", "yes", "on")


@dataclass
class Plan:
    """What `prepare_environment` decided; the environment is already updated."""

    model_names: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # a name a client may send -> served name
    copied: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    baked: list[str] = field(default_factory=list)  # served from the image (no volume, or copy failed)
    downloads: list[str] = field(default_factory=list)  # hub ids the service will download
    hf_home: str | None = None

    @property
    def writes_volume_later(self) -> bool:
        """The service itself will write to the volume (a download into its cache)."""
        return bool(self.downloads) and self.hf_home is not None


# ---- manifests (content hashes) and markers ----

_CHUNK = 1 << 20


def _files(folder: Path) -> list[tuple[str, int]]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP and not d.startswith((".partial", ".old")))
        for name in sorted(files):
            if name in _SKIP:
                continue
            path = Path(root) / name
            out.append((path.relative_to(folder).as_posix(), path.stat().st_size))
    return out


def read_source(folder: Path) -> dict:
    try:
        data = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _hash_all(folder: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each file, several files at once (hashlib releases the GIL on large updates)."""
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda rel: sha256_file(folder / rel), names)))


def _digest(files: dict[str, dict]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\t{files[rel]['size']}\t{files[rel]['sha256']}\n".encode())
    return digest.hexdigest()


def compute_manifest(folder: Path) -> dict:
    """SHA-256 and size of every file of a model folder (markers and caches left out)."""
    started = time.perf_counter()
    listed = _files(folder)
    # the largest first: one big weights file does not end up alone at the end of the pool
    hashes = _hash_all(folder, [rel for rel, _ in sorted(listed, key=lambda f: -f[1])])
    files = {rel: {"size": size, "sha256": hashes[rel]} for rel, size in listed}
    total = sum(size for _, size in listed)
    seconds = time.perf_counter() - started
    log.info("hashed %s: %d files, %.1f MB in %.2fs (%.0f MB/s)", folder, len(files), total / 1e6, seconds,
             total / 1e6 / max(seconds, 1e-9))
    return {"algorithm": "sha256", "digest": _digest(files), "files": files, "bytes": total}


def write_manifest(folder: Path) -> dict:
    """Bake time: the folder's manifest, written into it (the image then carries the trusted hashes)."""
    manifest = compute_manifest(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _valid_manifest(data: object) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return False
    try:
        return data.get("digest") == _digest(data["files"])
    except (KeyError, TypeError):
        return False


def baked_manifest(folder: Path) -> dict:
    """The manifest of a baked folder: the one baked into the image when it still lists exactly the
    folder's files and sizes, else computed now (one read of the folder, at every start)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        data = None
    if _valid_manifest(data):
        listed = {rel: {"size": size} for rel, size in _files(folder)}
        if listed == {rel: {"size": f["size"]} for rel, f in data["files"].items()}:
            return data
        log.warning("the manifest baked into %s does not list its files: hashing the folder instead", folder)
    else:
        log.info("no manifest baked into %s: hashing it (bake one with `python -m runpod_adapter.volume "
                 "manifest %s` to save this at every start)", folder, folder.parent)
    return compute_manifest(folder)


def read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "digest" in data else None


def copy_difference(folder: Path, want: dict) -> str | None:
    """Why the copy in `folder` is not the content of `want` (a manifest), or None when every file
    is there with the same SHA-256 and nothing else is; the marker must hold the same manifest."""
    marker = read_marker(folder)
    if marker is None:
        return "it has no completion marker (an interrupted copy, or another tool's folder)"
    if marker.get("digest") != want["digest"] or marker.get("files") != want["files"]:
        return f"its marker {MARKER} does not hold the image's manifest (another model revision, or a changed marker)"
    try:
        have = dict(_files(folder))
    except OSError as exc:
        return f"it cannot be read ({exc})"
    for rel in sorted(set(want["files"]) - set(have)):
        return f"file {rel} is missing"
    for rel in sorted(set(have) - set(want["files"])):
        return f"file {rel} is not in the image"
    for rel in sorted(have):
        if have[rel] != want["files"][rel]["size"]:
            return f"file {rel} has another size than in the image"
    try:
        hashes = _hash_all(folder, sorted(have, key=lambda rel: -have[rel]))
    except OSError as exc:
        return f"it cannot be read ({exc})"
    for rel in sorted(hashes):
        if hashes[rel] != want["files"][rel]["sha256"]:
            return f"file {rel} differs from the image (SHA-256)"
    return None


def is_complete_copy(folder: Path, want: dict | None = None) -> bool:
    """A finished copy (it has a marker); with `want`, one whose every file matches that manifest."""
    if want is None:
        return read_marker(folder) is not None
    return copy_difference(folder, want) is None


# ---- the atomic copy ----


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, (Path(root) / name).stat().st_mtime)
            except OSError:
                pass
    return newest


def remove_stale_temporaries(root: Path, name: str, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Temporary folders of `name` that nothing has written to for `stale_after_s` seconds."""
    removed = []
    now = time.time()
    for pattern in (f".{name}{PARTIAL}*", f".{name}{OLD}*"):
        for path in root.glob(pattern):
            try:
                if now - _newest_mtime(path) < stale_after_s:
                    continue  # another worker may be copying right now
            except OSError:
                continue
            log.info("removing %s, left by an interrupted copy", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def copy_to_volume(src: Path, models_root: Path, stale_after_s: float = STALE_AFTER_S) -> tuple[Path, bool]:
    """Make `<models_root>/<src.name>` a verified copy of `src`; returns (folder, copied_now)."""
    final = models_root / src.name
    want = baked_manifest(src)
    if final.exists():
        started = time.perf_counter()
        why = copy_difference(final, want)
        if why is None:
            log.info("checked the copy of %s on the network volume: %d files, %.1f MB hashed in %.2fs",
                     src.name, len(want["files"]), want["bytes"] / 1e6, time.perf_counter() - started)
            return final, False
        log.warning("the copy of %s on the network volume is not the image's: %s; copying it again", src.name, why)
    models_root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(models_root, src.name, stale_after_s)
    tmp = models_root / f".{src.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    log.info("copying %s to the network volume (%d files, %.1f MB)", src, len(want["files"]), want["bytes"] / 1e6)
    try:
        # shutil.copy, not copy2: fresh mtimes tell other workers that this copy is alive
        shutil.copytree(src, tmp, copy_function=shutil.copy, ignore=shutil.ignore_patterns(*_SKIP))
        marker = {**want, "source": str(src), **read_source(src), "copied_at": time.time(),
                  "host": socket.gethostname()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        why = copy_difference(tmp, want)  # what was written is what will be loaded
        if why is not None:
            raise OSError(f"the copy just written differs from the image: {why}")
        _publish(tmp, final, want)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("copied %s to %s in %.1fs", src.name, final, time.perf_counter() - started)
    return final, True


def _publish(tmp: Path, final: Path, want: dict) -> None:
    """Rename the finished copy into place; a complete copy that got there first wins."""
    for _ in range(3):
        if final.exists() and is_complete_copy(final, want):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if final.exists():
            # another revision, a copy without marker or one that failed its check: move it aside, remove it
            old = final.with_name(f".{final.name}{OLD}{uuid.uuid4().hex[:8]}")
            try:
                os.rename(final, old)
            except FileNotFoundError:
                pass
            else:
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
            return
        except OSError:
            continue  # another worker renamed its copy in between: look again
    raise OSError(f"could not move the copy of {final.name} into place at {final}")


# ---- MODEL_NAMES ----


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(";") if part.strip()]


def _served_name(entry: str) -> str:
    """The name the service gives an entry of MODEL_NAMES (runners.settings does the same)."""
    path = Path(entry)
    return path.resolve().name if path.is_dir() else entry


def find_baked(entry: str, baked_dir: Path) -> Path | None:
    """The baked folder an entry names: its path, or the hub id it was baked from."""
    if not baked_dir.is_dir():
        return None
    path = Path(entry)
    if path.is_dir():
        resolved = path.resolve()
        return resolved if resolved.parent == baked_dir.resolve() else None
    if path.is_absolute():
        return None
    folders = sorted(p for p in baked_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        if read_source(folder).get("repo_id") == entry:
            return folder
    base = entry.rstrip("/").rsplit("/", 1)[-1]
    for folder in folders:
        if folder.name == base and not read_source(folder):
            return folder  # a folder copied in without a source file: matched by name
    return None


def find_on_volume(entry: str, models_root: Path) -> Path | None:
    """A copy on the volume whose source is this hub id, from an image that baked it (not this one).

    This image cannot vouch for it: it is used when its files match the manifest in its own marker
    (an intact copy) and it holds no Python file (nothing in it runs as code); otherwise None, and
    the model is downloaded by its hub id like any other model MODEL_NAMES names.
    """
    if Path(entry).is_absolute() or not models_root.is_dir():
        return None
    for folder in sorted(models_root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        marker = read_marker(folder)
        if not marker or marker.get("repo_id") != entry:
            continue
        if not _valid_manifest(marker):
            why = "its marker has no valid manifest (a copy by an older image)"
        elif any(rel.endswith(".py") for rel in marker["files"]):
            why = "it holds Python files, and this image did not bake it, so its code cannot be checked"
        else:
            why = copy_difference(folder, marker)
        if why is None:
            return folder
        log.warning("not loading %s from %s, which this image did not bake: %s; downloading it by its hub id",
                    entry, folder, why)
    return None


def hub_cached(repo_id: str, env: MutableMapping[str, str]) -> bool:
    hub = env.get("HF_HUB_CACHE") or os.path.join(
        env.get("HF_HOME") or os.path.join(env.get("HOME", str(Path.home())), ".cache", "huggingface"), "hub"
    )
    snapshots = Path(hub) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    try:
        return any((s / "config.json").exists() for s in snapshots.iterdir())
    except OSError:
        return False


def prepare_environment(
    env: MutableMapping[str, str] | None = None, stale_after_s: float = STALE_AFTER_S
) -> Plan:
    """Copy baked models to the volume, point MODEL_NAMES at the folders to load, set HF_HOME.

    Call before `service` is imported: it reads MODEL_NAMES once, at import.
    """
    env = os.environ if env is None else env
    plan = Plan()
    raw = env.get("MODEL_NAMES", "").strip()
    if not raw:
        return plan  # the embedded default model: nothing baked, nothing to copy
    volume = Path(env.get("RUNPOD_VOLUME_PATH", "").strip() or DEFAULT_VOLUME_PATH)
    baked_dir = Path(env.get("BAKED_MODELS_DIR", "").strip() or DEFAULT_BAKED_DIR)
    has_volume = volume.is_dir()
    models_root = volume / "models"
    if has_volume and models_root.is_symlink():
        # root writes and removes folders in there: a link would send that anywhere
        log.warning("%s is a symbolic link: not using the network volume for models (remove the link)", models_root)
        has_volume = False
    entries = _split(raw)
    served = [_served_name(e) for e in entries]
    rewritten = list(entries)

    for i, entry in enumerate(entries):
        baked = find_baked(entry, baked_dir)
        if baked is not None:
            target = baked
            if has_volume:
                try:
                    target, copied = copy_to_volume(baked, models_root, stale_after_s)
                    (plan.copied if copied else plan.reused).append(entry)
                except OSError as exc:  # volume full or read-only: the baked copy still serves
                    log.warning("cannot copy %s to the network volume (%s): loading it from the image", baked, exc)
                    plan.baked.append(entry)
            else:
                plan.baked.append(entry)
            rewritten[i] = str(target)
            for name in {entry, str(baked), str(target), served[i]}:
                plan.aliases[name] = served[i]
            continue
        if Path(entry).is_dir():
            continue  # a local folder of the user's own: loaded where it is
        on_volume = find_on_volume(entry, models_root) if has_volume else None
        if on_volume is not None:
            rewritten[i] = str(on_volume)
            plan.reused.append(entry)
            plan.aliases[entry] = served[i]
            continue
        plan.downloads.append(entry)

    if plan.downloads:
        if has_volume and not env.get("HF_HOME"):
            env["HF_HOME"] = str(volume / "huggingface")
            plan.hf_home = env["HF_HOME"]
        missing = [repo for repo in plan.downloads if not hub_cached(repo, env)]
        if missing and env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
            log.warning(
                "MODEL_NAMES has %s, neither baked into the image nor cached: turning HF_HUB_OFFLINE off "
                "to download %s into %s", ", ".join(missing), "them" if len(missing) > 1 else "it",
                env.get("HF_HOME", "the Hugging Face cache"),
            )
            env["HF_HUB_OFFLINE"] = "0"
            env["TRANSFORMERS_OFFLINE"] = "0"

    plan.model_names = rewritten
    if rewritten != entries:
        env["MODEL_NAMES"] = ";".join(rewritten)
        if not env.get("SERVED_MODEL_NAMES", "").strip():
            env["SERVED_MODEL_NAMES"] = ";".join(served)
        else:  # the user's served names win; the original entries still reach them
            user_served = _split(env["SERVED_MODEL_NAMES"])
            if len(user_served) == len(entries):
                plan.aliases = {k: user_served[served.index(v)] for k, v in plan.aliases.items()}
            else:
                plan.aliases = {}
    for name in plan.copied:
        log.info("model %s: copied to the network volume, loaded from there", name)
    for name in plan.reused:
        log.info("model %s: loaded from the network volume", name)
    return plan


# ---- build time: bake models into the image ----


def bake(models: list[str], dest: Path, revisions: list[str] | None = None) -> list[Path]:
    """Download hub models into `dest/<name>` with a source file (the image's model stage)."""
    from huggingface_hub import HfApi, snapshot_download

    revisions = revisions or []
    if len(revisions) not in (0, 1, len(models)):
        raise SystemExit(f"{len(revisions)} revisions for {len(models)} models: give one per model or one for all")
    api = HfApi()
    out = []
    for i, repo_id in enumerate(models):
        revision = (revisions[i] if len(revisions) > 1 else revisions[0] if revisions else None) or None
        sha = api.model_info(repo_id, revision=revision).sha
        folder = dest / repo_id.rstrip("/").rsplit("/", 1)[-1]
        log.info("baking %s@%s into %s", repo_id, sha, folder)
        snapshot_download(
            repo_id,
            revision=sha,
            local_dir=folder,
            ignore_patterns=["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "*.gguf", "*.tflite"],
        )
        shutil.rmtree(folder / ".cache", ignore_errors=True)
        (folder / SOURCE_FILE).write_text(json.dumps({"repo_id": repo_id, "revision": sha}))
        write_manifest(folder)
        out.append(folder)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bake_cmd = sub.add_parser("bake", help="download hub models into a folder (image build)")
    bake_cmd.add_argument("--dest", type=Path, default=Path(DEFAULT_BAKED_DIR))
    bake_cmd.add_argument("--models", required=True, help="';'-separated hub ids")
    bake_cmd.add_argument("--revisions", default="", help="';'-separated revisions (optional)")
    manifest_cmd = sub.add_parser("manifest", help="write the content hashes of every model folder in a folder")
    manifest_cmd.add_argument("dest", type=Path, nargs="?", default=Path(DEFAULT_BAKED_DIR))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "manifest":
        folders = sorted(p for p in args.dest.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if args.dest.is_dir() else []
        if not folders:
            parser.error(f"{args.dest} has no model folder: give the folder that holds one folder per model")
        for folder in folders:
            write_manifest(folder)
        return 0
    models = _split(args.models)
    if not models:
        parser.error("--models names no model")
    bake(models, args.dest, _split(args.revisions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
