# CAND for the quiet-core cycle: the pinned editable folders + decode_chunk_size.patch + one new line
# in ops.cpp (with a timestamp, so that ccache has never seen it: a real one-file compile).
import importlib
import subprocess
import sys
import time
from pathlib import Path

from lab.harness import load

h = load("harnesses/llamacpp")
h.preflight()
source = importlib.import_module("harnesses.llamacpp.source")
tree = Path(sys.argv[1])
source.export_pristine(h.source_tree(), tree, ("ggml/src/ggml-cpu", "ggml/src/ggml-cuda"))
patch = Path("harnesses/llamacpp/solutions/correct/decode_chunk_size.patch").resolve()
subprocess.run(["git", "apply", str(patch)], cwd=tree, check=True)
ops = tree / "ggml/src/ggml-cpu/ops.cpp"
ops.write_text(ops.read_text() + f"\n// quiet-core cycle measurement {time.time()}\n")
print(tree)
