"""cdot: a tiny CPU harness for the lab's own tests (a compiled C function whose speed a patch
changes). It follows the same contract as the real harnesses: the lab builds `work.c` with its
own flags, checks it against numpy on secret seeds, and times fixed work on fresh inputs.

(It loads the candidate's shared object into the runner process with ctypes; that is fine for a
test harness, not for untrusted code: real harnesses keep candidate host code out of the timing
process.)
"""

import ctypes
import subprocess
import time
from pathlib import Path

import numpy as np

from lab import Build, Check, CheckItem, Harness, Metric, Sample
from lab.errors import LabError
from lab.harness import sha256_file

N = 1 << 18  # doubles per call, unless a "model" file (--model) names another length
MAX_N = 1 << 22
CALLS = 8  # calls per timed unit


class CDot(Harness):
    name = "cdot"
    description = "sum of squares in C (test harness)"
    metric = Metric("calls_per_s", "calls/s", higher_is_better=True)
    editable = ("work.c",)
    model_help = "a text file holding the vector length (how the lab's tests exercise --model)"
    timeout_seconds = 60.0
    min_pairs = 20
    min_timing_seconds = 0.3
    max_timing_seconds = 8.0

    def build(self, src: Path, out: Path) -> Build:
        artifact = out / "libwork.so"
        # Compile from inside the staged folder with a relative name so that the artifact is
        # bit-identical wherever the stage lies.
        proc = subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", str(artifact), "work.c"],
            cwd=src, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            return Build(ok=False, source_hash="", error=proc.stderr, report=proc.stderr)
        return Build(ok=True, source_hash="", artifact=str(artifact),
                     artifact_sha256=sha256_file(artifact), report=proc.stderr)

    @property
    def n(self) -> int:
        return self.model_identity()["elements"] if self.model_path else N

    @property
    def speed_of_light_seconds(self) -> float:
        return CALLS * self.n * 8 / 200e9  # 200 GB/s: no laptop or server streams faster

    def describe_model(self, path: Path) -> dict:
        text = path.read_text().strip() if path.is_file() else ""
        if not text.isdigit() or not 0 < int(text) <= MAX_N:
            raise LabError(f"{path} is no cdot model: it must hold one vector length from 1 to {MAX_N}")
        return {"name": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "elements": int(text)}

    def _function(self, build: Build):
        lib = ctypes.CDLL(build.artifact)
        lib.work.restype = ctypes.c_double
        lib.work.argtypes = [ctypes.c_void_p, ctypes.c_long]
        return lib.work

    def _inputs(self, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(self.n)

    def check(self, build: Build, seeds: list[int]) -> Check:
        fn = self._function(build)
        items, hashes = [], {}
        for seed in seeds:
            x = self._inputs(seed)
            got = fn(x.ctypes.data, x.size)
            want = float(np.dot(x, x))
            ok = bool(np.isfinite(got)) and abs(got - want) <= 1e-9 * abs(want)
            items.append(CheckItem(f"seed_{seed % 10000}", ok, {"got": got, "want": want},
                                   "" if ok else f"got {got!r}, want {want!r}"))
            hashes[str(seed)] = np.float64(got).tobytes().hex()
        passed = all(i.passed for i in items)
        return Check(passed=passed, items=items, output_hashes=hashes,
                     lines=[f"correctness: {'pass' if passed else 'fail'}"])

    def load(self, build: Build):
        return self._function(build)

    def sample(self, fn, seed: int) -> Sample:
        x = self._inputs(seed)
        want = float(np.dot(x, x))
        ptr = x.ctypes.data
        t0 = time.perf_counter()
        results = [fn(ptr, x.size) for _ in range(CALLS)]
        seconds = time.perf_counter() - t0
        ok = all(abs(r - want) <= 1e-9 * abs(want) for r in results)
        return Sample(seconds=seconds, value=CALLS / seconds, ok=ok, wall_seconds=seconds,
                      work={"calls": CALLS, "elements": x.size})

    def workload(self) -> dict:
        return {"calls": CALLS, "elements": self.n}
