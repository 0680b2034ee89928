"""The server against two OpenAPI contracts, with schemathesis (the CLI, in a subprocess: its own
process, phases and reporting, as a user would run it): Text Embeddings Inference's own published
document (tests/contracts/tei_openapi.json, see tests/contracts/README.md) under `/tei`, and the
server's own document (`GET /docs.json`). Every check but `positive_data_acceptance` (TEI's document
allows bodies this server refuses on purpose: text pairs on /predict, `dimensions: 0`, an ordinary
embedding model on /embed_all), every phase (examples, coverage, fuzzing).

One server: the embedded default model (all-MiniLM-L6-v2) and a tiny SPLADE model, so the sparse
route answers too. The seed is fixed, so a run is repeatable; CONTRACTS_SEED and
CONTRACTS_MAX_EXAMPLES change it (e.g. a longer search: CONTRACTS_MAX_EXAMPLES=300).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import checkpoints
import pytest

HERE = Path(__file__).resolve().parent
TEI_DOCUMENT = HERE / "contracts" / "tei_openapi.json"
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
SEED = os.environ.get("CONTRACTS_SEED", "20261201")
MAX_EXAMPLES = os.environ.get("CONTRACTS_MAX_EXAMPLES", "50")


@pytest.fixture(scope="module")
def url(start_server, default_model_path, tmp_path_factory) -> str:
    splade = checkpoints.build_splade(tmp_path_factory.mktemp("contracts") / "tiny-splade")
    return start_server({"MODEL_NAMES": f"{default_model_path};{splade}",
                         "SERVED_MODEL_NAMES": "all-MiniLM-L6-v2;splade"}).url


def schemathesis(location: str, base_url: str | None, workdir: Path) -> subprocess.CompletedProcess[str]:
    command = [SCHEMATHESIS, "run", location, "--checks", "all", "--exclude-checks", "positive_data_acceptance",
               "--max-examples", MAX_EXAMPLES, "--seed", SEED, "--generation-database", "none",
               "--request-timeout", "60", "--no-color"]
    if base_url:
        command += ["--url", base_url]
    # Its own folder: schemathesis reads a schemathesis.toml from, and writes reports to, where it runs.
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "120"})


def failures(run: subprocess.CompletedProcess[str]) -> str:
    """The failing cases (each with its curl line), as schemathesis prints them, and its summary."""
    out = run.stdout
    start = out.find("= FAILURES =")
    if start < 0:
        start = out.find("= ERRORS =")
    shown = out[out.rfind("\n", 0, start) + 1:] if start >= 0 else out[-6000:]
    return f"schemathesis exited with {run.returncode}:\n{' '.join(run.args)}\n{shown}\n{run.stderr[-3000:]}"


@pytest.mark.parametrize("contract", ["tei", "own"])
def test_the_server_meets_the_contract(url, contract, tmp_path):
    if contract == "tei":
        run = schemathesis(str(TEI_DOCUMENT), url + "/tei", tmp_path)
    else:
        run = schemathesis(url + "/docs.json", None, tmp_path)
    if run.returncode != 0:
        pytest.fail(failures(run), pytrace=False)
    assert "passed" in run.stdout and "Tested: 0" not in run.stdout, run.stdout[-3000:]
