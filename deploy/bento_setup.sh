#!/bin/sh
# The Bento image's setup script (bentofile.yaml, docker.setup_script): it runs as root once the Bento
# is copied into the image. The packages are already compiled (BentoML installs them with
# UV_COMPILE_BYTECODE=1); this compiles the service's own source, so that no start of the image
# compiles it again (the server runs as the unprivileged bentoml user, which cannot write
# __pycache__ there, so every start would compile it in memory).
set -eu
python -m compileall -q -j 0 "${BENTO_PATH:-/home/bentoml/bento}/src"
