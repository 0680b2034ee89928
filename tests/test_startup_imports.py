"""Cold start: what a text-only configuration imports on its way to the first answer (issue 24).

- The two front doors' start-up paths, each in a fresh process (the service module, its model load and
  a first embedding; the RunPod worker's handler, its model load, a first job and runpod's import):
  none of the heavy modules (scikit-learn, SciPy, audio and vision stacks, ONNX Runtime, infinity's
  server and batch handler) is imported, and the RunPod worker never imports BentoML. In the same
  process, afterwards, everything deferred still works when used: the evaluators' scikit-learn and
  SciPy functions, `from infinity_emb import AsyncEmbeddingEngine`, a plain `import sklearn`.
- A real `bentoml serve` of the embedded default: its worker has no scikit-learn, SciPy,
  torchvision or torchaudio library mapped (read from /proc/<pid>/maps after a first answer).
- The two deferring mechanisms of `runners.models.imports` on throwaway packages; transformers' index
  read back from its file (and scanned again when it is stale); the collector frozen after the stack;
  the serving process importing no model code.

Features that import these modules for real keep their own tests: tests/test_onnx.py (optimum and
ONNX Runtime), test_quantize.py, test_sparse.py, test_qwen3.py, test_clients.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from load_tests.processes import ROOT, hermetic_env

PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

# Shared libraries that only the heavy packages bring (scipy.libs/scikit_learn.libs hold their OpenBLAS/gomp).
HEAVY_LIBRARIES = ("/sklearn/", "/scipy/", "/scipy.libs/", "/scikit_learn.libs/", "/torchvision/", "/torchaudio/",
                   "/onnxruntime/")

# What a deferred name does once used, in the process that deferred it.
USE_DEFERRED = """
# sentence-transformers 6 imports these two at module level (its evaluators are imported lazily now)
util = "sentence_transformers.util."
report["pairwise"] = float(sys.modules[util + "similarity"].pairwise_distances([[0.0, 1.0]], [[0.0, 1.0]])[0][0])
report["coo"] = int(sys.modules[util + "tensor"].coo_matrix(([1.0], ([0], [1])), shape=(1, 2)).nnz)
import sklearn.metrics
report["sklearn_real"] = type(sys.modules["sklearn"]).__name__ == "module" and callable(sklearn.metrics.roc_curve)
from infinity_emb import AsyncEmbeddingEngine, EngineArgs
report["infinity_init"] = AsyncEmbeddingEngine.__name__ == "AsyncEmbeddingEngine" and EngineArgs.__name__ == "EngineArgs"
"""

SERVICE_PATH = """
import asyncio, json, sys
import service
from runners.capabilities.queries import EmbedQuery

async def first_answer():
    svc = service.EmbeddingService()
    await svc.start_engines()
    try:
        body = await svc.inference.embed(EmbedQuery(texts=["a first request"], token_ids=None, model=None))
        return len(body["data"][0]["embedding"]), svc.inference.registry.start_phases
    finally:
        await svc.stop_engines()

dims, phases = asyncio.run(first_answer())
from runners.models.imports import HEAVY_MODULES
loaded = sorted(m for m in HEAVY_MODULES if any(n == m or n.startswith(m + ".") for n in sys.modules))
import gc
report = {"heavy": loaded, "dims": dims, "phases": phases, "gc": gc.isenabled(), "frozen": gc.get_freeze_count()}
""" + USE_DEFERRED + "print(json.dumps(report))"

RUNPOD_PATH = """
import asyncio, json, sys
from runpod_adapter import handler
from runpod_adapter.__main__ import import_runpod

handler.configure()
handler.get_service()
handler.begin_loading()
import_runpod()
output = asyncio.run(handler.handler({"id": "j1", "input": {"input": ["a first job"]}}))
from runners.models.imports import HEAVY_MODULES
loaded = sorted(m for m in HEAVY_MODULES if any(n == m or n.startswith(m + ".") for n in sys.modules))
report = {"heavy": loaded, "bentoml": "bentoml" in sys.modules, "dims": len(output["data"][0]["embedding"])}
""" + USE_DEFERRED + """
import os
os._exit(print(json.dumps(report)) or 0)  # the engines' threads are not daemons
"""


def run_fresh(code: str, tmp_path: Path) -> dict:
    """Run `code` in a fresh interpreter; its last stdout line (JSON), with its stderr under "log"."""
    env = hermetic_env({"RUNPOD_VOLUME_PATH": str(tmp_path / "no-volume"),
                        "BAKED_MODELS_DIR": str(tmp_path / "no-baked-models")}, drop=("HF_HOME", "RUN_AS_USER"))
    done = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"log": done.stderr}


def check_deferred_still_work(report: dict) -> None:
    assert report["pairwise"] == 0.0
    assert report["coo"] == 1
    assert report["sklearn_real"] and report["infinity_init"]


def test_the_service_start_up_path_imports_no_heavy_module(tmp_path: Path) -> None:
    report = run_fresh(SERVICE_PATH, tmp_path)
    assert report["heavy"] == [], f"imported on the way to the first answer: {report['heavy']}"
    assert report["dims"] == 384
    # The collector was off while the stack imported, then froze what it created and runs again.
    assert report["gc"] and report["frozen"] > 100_000
    phases = report["phases"]
    assert set(phases) >= {"imports_s", "weights_read_s", "to_device_s", "warmup_s", "ready_s"}
    assert phases["imports_s"] > 0 and phases["ready_s"] >= phases["warmup_s"] > 0
    # The start-up log states each phase, in the line load_tests.cold_start reads.
    from load_tests.cold_start import phases as logged_phases

    logged = logged_phases(report["log"], first_answer_s=99.0)
    assert logged["imports_s"] == pytest.approx(phases["imports_s"], abs=0.006) and logged["process_age_s"] > 0
    assert logged["framework_s"] < 99.0
    check_deferred_still_work(report)


def test_the_runpod_worker_start_up_path_imports_no_heavy_module_nor_bentoml(tmp_path: Path) -> None:
    report = run_fresh(RUNPOD_PATH, tmp_path)
    assert report["heavy"] == [], f"imported on the way to the first answer: {report['heavy']}"
    assert report["bentoml"] is False, "the RunPod worker imported BentoML"
    assert report["dims"] == 384
    check_deferred_still_work(report)


def test_a_served_default_model_maps_no_heavy_library(default_server) -> None:
    import psutil

    response = httpx.post(default_server.url + "/v1/embeddings", json={"input": "hello"}, timeout=60)
    assert response.status_code == 200
    workers = [p for p in psutil.Process(default_server.proc.pid).children(recursive=True)
               if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
    assert workers, "no BentoML worker found"
    for worker in workers:
        maps = Path(f"/proc/{worker.pid}/maps").read_text()
        assert "/torch/lib/" in maps  # the model is loaded in this process
        mapped = sorted({line.split()[-1] for line in maps.splitlines() if any(h in line for h in HEAVY_LIBRARIES)})
        assert mapped == [], f"heavy libraries in the worker: {mapped[:5]}"


def test_the_runpod_import_skips_py_cpuinfos_subprocess(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import json, cpuinfo
        def refuse():
            raise AssertionError("py-cpuinfo ran")
        cpuinfo.get_cpu_info_json = refuse
        original = cpuinfo.get_cpu_info
        from runpod_adapter.__main__ import import_runpod, processor_name
        import_runpod()
        from runpod.serverless.utils import rp_debugger
        print(json.dumps({"processor": rp_debugger.PROCESSOR == processor_name() != "",
                          "restored": cpuinfo.get_cpu_info is original}))
    """)
    report = run_fresh(code, tmp_path)
    assert (report["processor"], report["restored"]) == (True, True)


# ---- the mechanisms, on throwaway packages ----


def write_packages(root: Path, tag: str) -> None:
    heavy, user, pkg = root / f"heavy_{tag}", root / f"user_{tag}", root / f"pkg_{tag}"
    for folder in (heavy, user, pkg, heavy / "sub"):
        folder.mkdir(parents=True)
    (heavy / "__init__.py").write_text("LOADED = True\nclass Thing: pass\n")
    (heavy / "sub" / "__init__.py").write_text("def double(x):\n    return 2 * x\n")
    (user / "__init__.py").write_text(
        f"from heavy_{tag}.sub import double\nfrom heavy_{tag} import Thing\nimport heavy_{tag}.sub as sub\n")
    (pkg / "__init__.py").write_text(
        f"from pkg_{tag}.light import VALUE\nfrom pkg_{tag}.heavy import HEAVY\nfrom pkg_{tag}.same import same\n")
    (pkg / "light.py").write_text("VALUE = 1\n")
    (pkg / "heavy.py").write_text("HEAVY = 'heavy'\n")
    (pkg / "same.py").write_text("def same():\n    return 'the function'\n")


@pytest.fixture
def packages(tmp_path: Path, request: pytest.FixtureRequest):
    tag = request.node.name.replace("test_", "")[:20]
    write_packages(tmp_path, tag)
    sys.path.insert(0, str(tmp_path))
    yield tag
    sys.path.remove(str(tmp_path))
    for name in [n for n in sys.modules if n.split(".")[0] in (f"heavy_{tag}", f"user_{tag}", f"pkg_{tag}")]:
        del sys.modules[name]


def test_a_deferred_module_is_imported_only_when_a_name_is_used(packages: str) -> None:
    from runners.models.imports import DeferredName, deferring_optional

    heavy, user = f"heavy_{packages}", f"user_{packages}"
    with deferring_optional({heavy: (user,)}):
        module = __import__(user)
        assert isinstance(module.double, DeferredName) and type(sys.modules[heavy]).__name__ == "_Placeholder"
    assert heavy not in sys.modules  # the placeholders are gone once the block ends
    assert not isinstance(object(), module.Thing)  # no instance can exist: nothing imported to say so
    assert heavy not in sys.modules
    assert module.double(21) == 42  # first use: the real function
    assert sys.modules[heavy].LOADED and sys.modules[f"{heavy}.sub"].double is module.double.resolve()
    assert isinstance(sys.modules[heavy].Thing(), module.Thing)


def test_other_importers_and_later_imports_get_the_real_module(packages: str) -> None:
    from runners.models.imports import deferring_optional

    heavy = f"heavy_{packages}"
    with deferring_optional({heavy: ("nobody_imports_it_this_way",)}):
        real = __import__(f"{heavy}.sub", fromlist=["double"])
    assert real.double(2) == 4 and sys.modules[heavy].LOADED


def test_a_deferred_package_init_runs_when_a_name_it_defines_is_read(packages: str) -> None:
    from runners.models.imports import defer_package_init

    pkg = f"pkg_{packages}"
    module = defer_package_init(pkg)
    light = __import__(f"{pkg}.light", fromlist=["VALUE"])  # a submodule alone: no __init__
    assert light.VALUE == 1 and f"{pkg}.heavy" not in sys.modules
    __import__(f"{pkg}.same")  # the submodule named like a function its __init__ re-exports
    assert module.same() == "the function"  # the __init__ ran: the name is the function, not the module
    assert module.HEAVY == "heavy" and type(module).__name__ == "module"


# ---- transformers' index of its models, remembered ----

INDEX_RUN = """
import json, sys
from runners.models import imports
imports.INDEX_FILE = imports.Path(sys.argv[1])
with imports.remembered_index():
    import transformers
    from transformers import AutoModel, BertModel
from transformers.utils import import_utils
scan = import_utils.define_import_structure
report = {"wrapped": hasattr(scan, "__wrapped__"), "bert": BertModel.__name__, "auto": AutoModel.__name__,
          "marker": transformers._class_to_module.get("RememberedMarker"), "same": []}
for key, stored in imports._read_indexes().items():
    version, path, prefix, _ = key.split("|")
    if version == transformers.__version__:
        real = scan.__wrapped__(path, None if prefix == "None" else prefix)
        report["same"].append(imports._decode(stored) == real)
print(json.dumps(report))
"""


def test_transformers_index_is_read_back_from_its_file_while_it_matches(tmp_path: Path) -> None:
    index = tmp_path / "transformers-index.json"
    first = run_fresh(INDEX_RUN.replace("sys.argv[1]", repr(str(index))), tmp_path)
    assert first["wrapped"] and (first["bert"], first["auto"]) == ("BertModel", "AutoModel")
    assert len(first["same"]) >= 2 and all(first["same"])  # what was stored is what transformers scans
    assert first["marker"] is None
    # A name only the file knows proves the next start reads it instead of scanning.
    stored = json.loads(index.read_text())
    models_key = next(k for k in stored if k.split("|")[2] == "models")
    modules = next(m for _, m in stored[models_key] if "models.bert.modeling_bert" in m)
    modules["models.bert.modeling_bert"].append("RememberedMarker")
    index.write_text(json.dumps(stored))
    second = run_fresh(INDEX_RUN.replace("sys.argv[1]", repr(str(index))), tmp_path)
    assert second["marker"] == "models.bert.modeling_bert" and second["bert"] == "BertModel"
    # Another version of transformers (or a changed folder): the stored entry no longer matches, it scans.
    index.write_text(json.dumps({"0.0|" + k.split("|", 1)[1]: v for k, v in stored.items()}))
    third = run_fresh(INDEX_RUN.replace("sys.argv[1]", repr(str(index))), tmp_path)
    assert third["marker"] is None and all(third["same"]) and third["bert"] == "BertModel"


def test_an_index_that_cannot_be_written_costs_only_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runners.models import imports

    calls = []

    def scan(path, prefix=None):
        calls.append(path)
        return {frozenset(): {"models.a": {"A"}}}

    scanned = tmp_path / "models"
    scanned.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(imports, "INDEX_FILE", blocker / "index.json")  # a folder that is a file
    remembering = imports.remembering_index(scan)
    assert remembering(str(scanned), "models") == {frozenset(): {"models.a": {"A"}}}
    assert calls == [str(scanned)]
    monkeypatch.setattr(imports, "INDEX_FILE", tmp_path / "cache" / "index.json")
    remembering = imports.remembering_index(scan)
    remembering(str(scanned), "models")
    assert imports.remembering_index(scan)(str(scanned), "models") == {frozenset(): {"models.a": {"A"}}}
    assert len(calls) == 2  # the third call was read from the file the second wrote


def test_the_serving_process_imports_no_model_code(tmp_path: Path) -> None:
    """`bentoml serve`'s serving process imports service.py before it starts the worker, which imports
    it again: the serving process needs the routes and the config, never numpy, torch or the engine."""
    code = textwrap.dedent("""
        import json, sys
        import bentoml
        import service
        print(json.dumps({"loaded": sorted(m for m in ("numpy", "torch", "transformers", "runners.capabilities.service",
                                                          "runners.engine.loaded", "runners.models.load") if m in sys.modules)}))
    """)
    assert run_fresh(code, tmp_path)["loaded"] == []
