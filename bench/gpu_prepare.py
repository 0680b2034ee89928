"""Prepare, on a machine with PyPI, what `bench/gpu_bench.sh` needs on a GPU machine that has no network.

    python -m bench.gpu_prepare            # writes .gpu_bundle/ (git-ignored through .git/info/exclude)

The GPU machine (the `device` tool's nvidia-h100-x1 / nvidia-h200) runs an image with Python 3.12,
a CUDA PyTorch, numpy, transformers 5, sentence-transformers 6 and a long list of common packages
(IMAGE_PACKAGES, as /work/.library/device/KINDS.md lists it), but no BentoML and no Infinity. So:
- wheels/: cp312 manylinux wheels, without dependencies, of every package that `bentoml`,
  `infinity-emb[server]` and the pinned model stack need and the image lacks, at the versions of this
  environment; plus the four the image has at versions this project cannot use (FORCED);
- model/: the embedded default model's config, tokenizer and sentence-transformers files, without
  its 87 MiB of weights (the carry limit is 64 MiB): `bench/gpu_model.py` builds random weights of the
  same shape there, so every FLOP and every token is the same as with the real model;
- wrk/: Debian's wrk (bin/wrk) and the libraries it links that a CUDA image may lack (LuaJIT, OpenSSL 3),
  unpacked from the .debs (`apt-get download`, no root needed) or copied from this machine's install;
  bench.run finds it there and runs it with LD_LIBRARY_PATH=wrk/lib (it needs glibc >= 2.34). Without
  it (`--no-wrk`, or when neither way works) the GPU run measures those rows with httpx, and says so.
The whole bundle must stay under the device tool's 64 MiB; this script fails when it does not.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gpu_model import MODEL_FILES

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu_bundle"
LIMIT_BYTES = 60 * 1024 * 1024  # the device tool carries 64 MiB with the working tree

ROOTS = {"bentoml": set(), "infinity-emb": {"server"}, "sentence-transformers": set(), "transformers": set(),
         "tokenizers": set(), "huggingface-hub": set()}
# The image has these at versions this project's pins exclude (transformers 5, sentence-transformers 6,
# tokenizers 0.23, huggingface-hub 1.x): carry ours, which shadow the image's on PYTHONPATH.
FORCED = {"transformers", "sentence-transformers", "tokenizers", "huggingface-hub"}
IMAGE_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
TARGET_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
    "os_name": "posix",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
WRK_DEBS = ("wrk", "libluajit-5.1-2", "libssl3")
WRK_LIBS = ("libluajit-5.1.so.2", "libssl.so.3", "libcrypto.so.3")


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def closure() -> dict[str, str]:
    """name -> version of every distribution the roots need on the GPU host (markers for Python 3.12, Linux)."""
    from packaging.requirements import Requirement

    extras_seen: dict[str, set[str]] = {}
    stack = [(name, extras) for name, extras in ROOTS.items()]
    while stack:
        name, extras = stack.pop()
        key = canonical(name)
        if key in extras_seen and extras <= extras_seen[key]:
            continue
        extras_seen[key] = extras_seen.get(key, set()) | extras
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional part this environment lacks (posthog: telemetry, off anyway)
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = req.marker is None or any(
                req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in ["", *sorted(extras_seen[key])]
            )
            if wanted:
                stack.append((req.name, set(req.extras)))
    versions = {}
    for key in extras_seen:
        try:
            versions[key] = md.version(key)
        except md.PackageNotFoundError:
            pass
    return versions


def to_carry(versions: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(versions.items()) if k in FORCED or k not in IMAGE_PACKAGES}


def download(packages: dict[str, str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
            "-d", str(dest)]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    argv += [f"{name}=={version}" for name, version in packages.items()]
    subprocess.run(argv, check=True)


def copy_model(dest: Path) -> None:
    from runners.settings import default_model_path

    src = Path(default_model_path())
    for name in MODEL_FILES:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, target)


def bundle_wrk(dest: Path) -> str:
    """wrk into dest/bin and the libraries of WRK_LIBS into dest/lib; '' when done, else why not."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        binary: Path | None = None
        libs: dict[str, Path] = {}
        try:
            subprocess.run(["apt-get", "download", *WRK_DEBS], cwd=tmp, check=True, capture_output=True, timeout=300)
            for deb in Path(tmp).glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=120)
            binary = root / "usr" / "bin" / "wrk"
            libs = {p.name: p for p in root.rglob("*.so*") if p.name in WRK_LIBS}
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"apt-get download {' '.join(WRK_DEBS)} failed ({exc}); trying this machine's wrk", file=sys.stderr)
        if binary is None or not binary.is_file() or set(libs) != set(WRK_LIBS):
            installed = shutil.which("wrk")
            if not installed:
                return "no wrk .debs (apt-get download) and no wrk installed here"
            binary = Path(installed)
            ldd = subprocess.run(["ldd", installed], capture_output=True, text=True, timeout=30).stdout
            for line in ldd.splitlines():  # "libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x...)"
                parts = line.split()
                if len(parts) >= 3 and parts[0] in WRK_LIBS and parts[1] == "=>":
                    libs[parts[0]] = Path(parts[2])
            if set(libs) != set(WRK_LIBS):
                return f"wrk's libraries not found: {sorted(set(WRK_LIBS) - set(libs))}"
        (dest / "bin").mkdir(parents=True, exist_ok=True)
        (dest / "lib").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(binary, dest / "bin" / "wrk")
        (dest / "bin" / "wrk").chmod(0o755)
        for name, path in libs.items():
            shutil.copyfile(path.resolve(), dest / "lib" / name)  # the file, not the soname link
    return ""


def ignore_bundle() -> None:
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir():
        lines = exclude.read_text().splitlines() if exclude.exists() else []
        if "/.gpu_bundle/" not in lines:
            exclude.write_text("\n".join([*lines, "/.gpu_bundle/"]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print what would be carried, download nothing")
    parser.add_argument("--no-wrk", action="store_true", help="leave wrk out (the GPU run then loads with httpx)")
    args = parser.parse_args(argv)
    carry = to_carry(closure())
    if args.list:
        print("\n".join(f"{k}=={v}" for k, v in carry.items()))
        return 0
    ignore_bundle()
    shutil.rmtree(BUNDLE, ignore_errors=True)
    download(carry, BUNDLE / "wheels")
    copy_model(BUNDLE / "model")
    wrk = "left out (--no-wrk)" if args.no_wrk else (bundle_wrk(BUNDLE / "wrk") or "bundled")
    if wrk != "bundled":
        print(f"wrk: {wrk}; the GPU run will load the wrk rows with httpx", file=sys.stderr)
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    manifest = {"packages": carry, "wrk": wrk, "bytes": size}
    (BUNDLE / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(carry)} wheels, the model's config and wrk ({wrk}) in {BUNDLE}: {size / 2**20:.1f} MiB")
    if size > LIMIT_BYTES:
        print(f"too large for the device tool's 64 MiB carry (limit used here {LIMIT_BYTES / 2**20:.0f} MiB)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
