#!/usr/bin/env bash
# Install the MLX harness's pinned packages into the current Python environment. Idempotent:
# does nothing when the pinned versions are already there.
#
#   harnesses/mlx/setup.sh                        Linux: mlx[cpu] (what CI tests); macOS: Metal
#   LAB_MLX_BACKEND=cuda13 harnesses/mlx/setup.sh mlx[cuda13], NVIDIA SM >= 7.5, driver >= 580
#                                                 (written, never run on our machines)
#   PYTHON=/path/to/python harnesses/mlx/setup.sh another interpreter (default: the active venv's)
#
# tokenizers and transformers are pinned too: the offline tiny model's tokenizer is trained at
# first use, and another tokenizers version may train another one (its hash would then differ).
set -euo pipefail

py="${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/}python3}"
case "$(uname -s)" in
  Darwin) backend="${LAB_MLX_BACKEND:-metal}" ;;
  *) backend="${LAB_MLX_BACKEND:-cpu}" ;;
esac
case "$backend" in
  cpu) pkgs=("mlx-lm[cpu]==0.32.2" "mlx==0.32.4" "mlx-cpu==0.32.4") ;;
  cuda13) pkgs=("mlx-lm[cuda13]==0.32.2" "mlx==0.32.4" "mlx-cuda-13==0.32.4") ;;
  metal) pkgs=("mlx-lm==0.32.2" "mlx==0.32.4" "mlx-metal==0.32.4") ;;
  *) echo "setup.sh: LAB_MLX_BACKEND must be cpu, cuda13 or metal (got '$backend')" >&2; exit 2 ;;
esac
pkgs+=("tokenizers==0.23.3" "transformers==5.23.0")

if "$py" - "${pkgs[@]}" <<'PY'
import re
import sys
from importlib.metadata import PackageNotFoundError, version

for spec in sys.argv[1:]:
    name, wanted = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(.+)", spec).groups()
    try:
        if version(name) != wanted:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
  echo "setup.sh: the MLX harness's packages ($backend) are installed"
else
  "$py" -m pip install "${pkgs[@]}"
fi
"$py" -c "import importlib.util, mlx.core as mx; assert importlib.util.find_spec('mlx_lm'); print('mlx', mx.__version__, mx.default_device())"
