#!/bin/sh
# The Bento image's setup script (bentofile.yaml, docker.setup_script): it runs as root once the Bento
# is copied into the image. The packages are already compiled (BentoML installs them with
# UV_COMPILE_BYTECODE=1); this compiles the service's own source, so that no start of the image
# compiles it again (the server runs as the unprivileged bentoml user, which cannot write
# __pycache__ there, so every start would compile it in memory). Then it imports the model stack once,
# which writes transformers' index of its models beside the bytecode (runners/models/imports.py:
# INDEX_FILE), so that no start scans transformers' ~400 model folders again either.
set -eu
src="${BENTO_PATH:-/home/bentoml/bento}/src"
python -m compileall -q -j 0 "$src"
cd "$src" && python -c "from runners.models.imports import import_model_stack; import_model_stack()"
