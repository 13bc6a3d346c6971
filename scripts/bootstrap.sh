#!/usr/bin/env bash
# Set up everything the lab needs on a fresh machine, idempotently: a virtual environment in
# .venv with the lab installed (editable) and the extras its tests and harnesses use.
#
# torch: a machine that already has one (our GPU machine ships torch with CUDA) keeps it, seen
# through --system-site-packages; elsewhere we install torch==2.13.0 first, which on our CPU
# machines is a local CPU build (docs/decisions.md). The project's own range (torch>=2.4) is then
# already met, so pip takes nothing bigger.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# bubblewrap: the sandbox of every process that compiles or runs candidate code (lab/sandbox.py).
# Without root it must already be there; the lab then refuses to evaluate and says what to do.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap; } >/dev/null 2>&1 \
    || echo "bootstrap: warning: bubblewrap could not be installed" >&2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
# pip's exit status survives the filter (pipefail); the filter only drops a noisy warning of
# this machine's pip configuration.
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
pip install -e ".[dev,cuda,agent,docker,plot,cluster]"
# The llama.cpp and MLX harnesses bring their own setup (apt tools and the model package; the
# pinned mlx wheels). Their tests need them, so CI (CI=true) fails when one does not succeed; a
# user who only runs wavegru may lack root for apt, so elsewhere a failure is a warning and
# those harnesses' tests skip, saying why.
for setup in harnesses/llamacpp/setup.sh harnesses/mlx/setup.sh; do
  if ! PYTHON=.venv/bin/python bash "$setup" >/tmp/lab-setup.$$.log 2>&1; then
    tail -20 /tmp/lab-setup.$$.log >&2
    if [ "${CI:-}" = "true" ]; then echo "bootstrap: $setup failed" >&2; exit 1; fi
    echo "bootstrap: warning: $setup failed; that harness is not ready (its tests will skip)" >&2
  fi
done
rm -f /tmp/lab-setup.$$.log
.venv/bin/python -c "import lab, torch, click, numpy; print('lab', lab.__version__, '| torch', torch.__version__)"
