"""`bentoml build` of the real bentofile (models baked from the model store), the built Bento
serving, and the Kubernetes manifests checked against the API's models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import BENTOML

from load_tests.processes import ROOT, ServerProcess, hermetic_env

PYTHON = sys.executable


def test_bentofile_pins_equal_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]
    deps = re.findall(r'^    "(.+)",$', pyproject, re.M)
    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bento["python"]["packages"] == deps


@pytest.fixture(scope="module")
def built_bento(tmp_path_factory, default_model_path, tiny_models) -> dict[str, str]:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = hermetic_env({"BENTOML_HOME": str(home)})
    # Stand-ins for the two Qwen3 models the bentofile bakes: same store names, local folders.
    for source, name, served in [(default_model_path, "qwen3-embedding-0.6b", "sentence-transformers/all-MiniLM-L6-v2"),
                                 (str(tiny_models["qwen3-reranker"]), "qwen3-reranker-0.6b", "Qwen/Qwen3-Reranker-0.6B")]:
        subprocess.run([PYTHON, "-m", "runners.model_store", "import", source, "--name", name, "--served-name", served],
                       cwd=ROOT, env=env, check=True, capture_output=True)
    out = subprocess.run([BENTOML, "build", "--output", "tag", str(ROOT)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    tag = re.search(r"embed-rerank:\w+", out).group(0)
    # BentoML prints through rich, which wraps a long path at the terminal's width (80 without one).
    path = subprocess.run([BENTOML, "get", tag, "-o", "path"], env=env | {"COLUMNS": "4096"}, check=True,
                          capture_output=True, text=True).stdout.strip()
    return {"home": str(home), "tag": tag, "path": path}


def test_bento_dockerfile_is_cuda_with_pinned_packages(built_bento):
    bento = Path(built_bento["path"])
    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.8[\w.-]*-runtime", dockerfile, re.M)
    assert "ENV MODEL_NAMES=$MODEL_NAMES" in dockerfile and "HF_HUB_OFFLINE" in dockerfile
    requirements = (bento / "env/python/requirements.txt").read_text().split()
    for pin in ("torch==2.13.0", "bentoml==1.4.40", "transformers==5.24.0", "runpod==1.12.0"):
        assert pin in requirements
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert sorted(m["tag"].split(":")[0] for m in meta["models"]) == ["qwen3-embedding-0.6b", "qwen3-reranker-0.6b"]


def test_bento_carries_every_source_module(built_bento):
    """The bentofile's include patterns reach into runners/'s sub-packages (the serving test below runs
    with the checkout on PYTHONPATH, so it would not notice a module the Bento lacks)."""
    src = Path(built_bento["path"]) / "src"
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "runners").rglob("*.py")} | {"service.py"}
    carried = {p.relative_to(src).as_posix() for p in src.rglob("*.py")}
    assert wanted <= carried, sorted(wanted - carried)


def test_both_images_carry_compiled_bytecode(built_bento, tmp_path):
    """Cold start: neither image compiles the service's source at start (issue 24). The Bento's setup
    script, run on a copy of the built Bento, leaves a .pyc beside every module; Dockerfile.runpod
    compiles /app after copying the code, before it makes the tree readable."""
    import importlib.util
    import shutil

    bento = Path(built_bento["path"])
    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    assert re.search(r"^RUN .*env/docker/setup_script\s*$", dockerfile, re.M), "the Bento's Dockerfile runs no setup script"
    copy = tmp_path / "bento"
    shutil.copytree(bento / "src", copy / "src")
    subprocess.run(["sh", str(bento / "env/docker/setup_script")], env={"PATH": str(Path(PYTHON).parent) + ":/usr/bin:/bin",
                   "BENTO_PATH": str(copy)}, check=True)
    missing = [p for p in (copy / "src").rglob("*.py") if not Path(importlib.util.cache_from_source(str(p))).exists()]
    assert not missing, missing[:5]
    index = json.loads((copy / "src/runners/models/__pycache__/transformers-index.json").read_text())
    assert any(key.split("|")[2] == "models" for key in index)  # transformers' index, built with the image
    runpod = (ROOT / "Dockerfile.runpod").read_text()
    compile_at = runpod.index("python -m compileall")
    index_at = runpod.index("import_model_stack()")
    assert runpod.index("COPY runners ./runners") < compile_at < index_at < runpod.index("chmod -R a+rX /app")


def test_bento_export_carries_the_models(built_bento, tmp_path):
    target = tmp_path / "bento.tar"
    env = hermetic_env({"BENTOML_HOME": built_bento["home"]})
    subprocess.run([BENTOML, "export", built_bento["tag"], str(target)], env=env, check=True, capture_output=True)
    names = tarfile.open(target).getnames()
    assert any(n.lstrip("./").startswith("models/qwen3-reranker-0.6b/") and n.endswith("model.safetensors") for n in names)
    assert any(n.lstrip("./").startswith("models/qwen3-embedding-0.6b/") and n.endswith("model.safetensors") for n in names)


def test_built_bento_serves_from_its_baked_models(built_bento, tmp_path):
    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    image_env = {e["name"]: e["value"] for e in bento["envs"]}
    env = hermetic_env({"BENTOML_HOME": built_bento["home"], **image_env})
    env.pop("PYTHONPATH")  # the Bento must carry its own code
    server = ServerProcess.bentoml(tmp_path / "bento.log", target=built_bento["tag"], env=env, cwd=tmp_path)
    url = server.url
    try:
        server.wait_ready(120)
        emb = httpx.post(url + "/v1/embeddings", json={"model": "sentence-transformers/all-MiniLM-L6-v2",
                                                       "input": "hello"}).json()
        assert len(emb["data"][0]["embedding"]) == 384
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models == ["sentence-transformers/all-MiniLM-L6-v2", "Qwen/Qwen3-Reranker-0.6B"]
        rr = httpx.post(url + "/rerank", json={"query": "q", "docs": ["a", "b"]}).json()
        assert rr["model"] == "Qwen/Qwen3-Reranker-0.6B" and len(rr["results"]) == 2
    finally:
        server.stop()


def _round_trip(doc: dict) -> None:
    """Deserialize into the client's typed models (required fields enforced) and back: a
    misspelled or misplaced field disappears on the way and the comparison catches it."""
    from kubernetes import client

    api = client.ApiClient()
    kinds = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
             ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
             ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim"}
    model = api._ApiClient__deserialize(doc, kinds[(doc["apiVersion"], doc["kind"])])
    assert api.sanitize_for_serialization(model) == doc


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "hpa.yaml", "data.yaml"])
def test_kubernetes_manifests_validate(name):
    for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes" / name).read_text()):
        _round_trip(doc)


def test_manifests_agree_with_each_other_and_the_service():
    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    hpa = yaml.safe_load((ROOT / "deploy/kubernetes/hpa.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    timeout = next(int(e["value"]) for e in container["env"] if e["name"] == "REQUEST_TIMEOUT")
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > timeout
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in (ROOT / "runners/metrics.py").read_text()
    claim = yaml.safe_load((ROOT / "deploy/kubernetes/data.yaml").read_text())["metadata"]["name"]
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    data_dir = next(e["value"] for e in container["env"] if e["name"] == "DATA_DIR")
    assert any(volumes[name] == claim and path == data_dir for name, path in mounts.items())


def test_runpod_dockerfile_copies_everything_pip_install_needs():
    """`pip install .` in Dockerfile.runpod fails on a package folder the image did not COPY."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dockerfile = (ROOT / "Dockerfile.runpod").read_text()
    copied = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    needed = {package.split(".")[0] for package in setuptools["packages"]}  # sub-packages come with their folder
    needed |= {f"{m}.py" for m in setuptools["py-modules"]} | {"README.md"}
    assert needed <= copied, needed - copied
