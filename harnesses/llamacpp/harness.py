"""llama.cpp token generation: tg128 of Gemma 3 270M Q4_K_M, CPU backend (CUDA where a GPU is).

The agent edits the ggml CPU and CUDA backends of a pinned llama.cpp tree
(`ggml/src/ggml-cpu/**`, `ggml/src/ggml-cuda/**`); every other file of the tree, and every file
of this folder, is locked. The harness builds the tools with its own CMake flags from the pinned
tree plus the staged editable files (build.py), checks a build against the pristine build of the
same tree (oracle.py), and times one llama-bench tg128 repetition per sample in a separate
process, parsing its JSONL and cross-checking it with its own wall clock (bench.py). Candidate
code never runs in the harness's process. Notes for the agent: program.md.

`--model PATH` (on the lab's commands that evaluate) runs another GGUF model; LAB_LLAMACPP_BACKEND=cpu|cuda
overrides the backend (default: cuda when nvidia-smi sees a GPU and nvcc is there, else cpu);
LAB_LLAMACPP_SOURCE=auto|git|sdist and LAB_LLAMACPP_GIT_URL choose where the pinned tree comes
from (source.py).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lab import Build, Check, Environment, Harness, Metric, Sample
from lab.errors import EnvironmentUnavailable

from . import bench, build as builder, model as models, oracle, source
from .profile import cpu_digest, cuda_digest

EDITABLE_ROOTS = ("ggml/src/ggml-cpu", "ggml/src/ggml-cuda")
ENV_BACKEND = "LAB_LLAMACPP_BACKEND"


@dataclass
class Loaded:
    bindir: Path
    command: list[str]
    threads: int
    env: dict


class LlamaCpp(Harness):
    name = "llamacpp"
    description = ("llama.cpp tg128 (128 generated tokens, batch 1) of Gemma 3 270M Q4_K_M; "
                   "editable: the ggml CPU and CUDA backends of llama.cpp 0c1e57098")
    metric = Metric("tg128_tps", "tokens/s", higher_is_better=True)
    editable = tuple(f"{root}/**" for root in EDITABLE_ROOTS)
    # The first build of a fresh machine compiles the whole tree (~5-10 min on 2 cores).
    timeout_seconds = 1800.0
    min_pairs = 20
    min_timing_seconds = 0.0
    max_timing_seconds = 180.0  # a pair is two llama-bench processes: ~4.5 s on 2 quiet cores, 8+ s on busy ones
    oracle_seeds = 2
    model_help = "a GGUF model file"

    def __init__(self, root: Path):
        super().__init__(root)
        cuda = self.backend == "cuda"
        self.environment = Environment(dockerfile="Dockerfile.cuda" if cuda else "Dockerfile.cpu",
                                       nix_shell=".#cuda" if cuda else ".#cpu", needs_gpu=cuda)

    # --- where things live ---------------------------------------------------------------------
    @property
    def home(self) -> Path:
        from lab.runner import default_cache

        return default_cache() / "llamacpp"

    @cached_property
    def backend(self) -> str:
        chosen = os.environ.get(ENV_BACKEND, "").strip().lower()
        if chosen in ("cpu", "cuda"):
            return chosen
        if chosen:
            raise EnvironmentUnavailable(f"{ENV_BACKEND}={chosen!r}: use cpu or cuda")
        has_gpu = shutil.which("nvidia-smi") and shutil.which("nvcc") and subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True).returncode == 0
        return "cuda" if has_gpu else "cpu"

    @cached_property
    def flavor(self) -> builder.Flavor:
        return builder.Flavor("cuda", builder.cuda_arch()) if self.backend == "cuda" else builder.Flavor("cpu")

    def source_tree(self) -> Path:
        return source.prepare_tree(self.home)

    def model(self) -> models.Model:
        return models.resolve(self.home, self.model_path)

    def describe_model(self, path: Path) -> dict:
        return models.describe(path).describe()

    @property
    def speed_of_light_seconds(self) -> float | None:
        """n_gen tokens, each reading every weight once, at a bandwidth no machine of ours has."""
        try:
            size = self.model().size
        except EnvironmentUnavailable:
            return None
        return bench.N_GEN * size / bench.MAX_BANDWIDTH[self.backend]

    def preflight(self) -> None:
        missing = builder.missing_tools(self.flavor)
        if missing:
            raise EnvironmentUnavailable(
                f"llamacpp needs {', '.join(missing)} on PATH; run harnesses/llamacpp/setup.sh "
                "(apt-get install cmake ninja-build ccache g++ git)")
        self.model()
        self.source_tree()

    # --- build ---------------------------------------------------------------------------------
    def build(self, src: Path, out: Path) -> Build:
        return builder.build(Path(src), Path(out), home=self.home, flavor=self.flavor,
                             is_editable=self.is_editable, roots=EDITABLE_ROOTS)

    def baseline(self) -> Build:
        """The pristine tree's build (the oracle's reference), through the lab's build cache."""
        from lab.runner import build_cached, default_cache

        stage = self.home / "pristine-stage" / source.TREE_HASH[:16]
        if not stage.exists():
            tmp = stage.with_name(stage.name + f".{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            source.export_pristine(source.prepare_tree(self.home), tmp, EDITABLE_ROOTS)
            os.replace(tmp, stage)
        built = build_cached(self, stage, default_cache())
        if not built.ok:
            raise EnvironmentUnavailable(f"the pristine llama.cpp tree does not build here: {built.error[-1500:]}")
        return built

    # --- check ---------------------------------------------------------------------------------
    def check(self, build: Build, seeds: list[int]) -> Check:
        model = self.model()
        base = self.baseline()
        reference = oracle.Reference(oracle.Tools(Path(base.artifact), model.path, self.backend),
                                     self.home / "reference" / self._reference_key(model, base))
        result = oracle.run(oracle.Tools(Path(build.artifact), model.path, self.backend), reference, list(seeds),
                            changed=build.info.get("changed_files", []))
        result.lines.insert(0, f"model {model.path.name} ({model.architecture}, sha256 {model.sha256[:12]}...), "
                               f"llama.cpp {source.COMMIT}, backend {self.flavor.backend}{self.flavor.cuda_arch}")
        for item in result.items:
            item.values.setdefault("model_sha256", model.sha256)
        return result

    def _reference_key(self, model: models.Model, base: Build) -> str:
        """The baseline's answers hold for one machine (ISA, GPU), model and pristine binary."""
        parts = [source.TREE_HASH, self.flavor.key, model.sha256, base.artifact_sha256, _machine()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]

    # --- timing --------------------------------------------------------------------------------
    def load(self, build: Build) -> Loaded:
        cpus = sorted(os.sched_getaffinity(0))
        threads = len(cpus)
        bindir = Path(build.artifact)
        cmd = bench.command(bindir / "llama-bench", self.model().path, backend=self.backend, threads=threads,
                            cpu_mask=bench.cpu_mask(cpus))
        return Loaded(bindir=bindir, command=cmd, threads=threads, env=oracle.clean_env())

    def sample(self, loaded: Loaded, seed: int) -> Sample:
        # The seed has nothing to vary: llama-bench generates from fixed tokens, and the oracle
        # (secret seeds) is what checks that the outputs are right.
        return bench.run(loaded.command, env=loaded.env, threads=loaded.threads,
                         min_seconds=self.speed_of_light_seconds or 0.0, build_commit=source.COMMIT)

    def workload(self) -> dict:
        """The fixed work; each Sample's counters add the threads, which are the cores the runner
        pins the timing to (known only then)."""
        return {"n_gen": bench.N_GEN, "n_prompt": bench.N_PROMPT}

    # --- profile (never feeds a verdict) -------------------------------------------------------
    def profile(self, build: Build) -> str:
        if self.backend == "cuda":
            return cuda_digest(Path(build.artifact), self.model().path)
        cpus = sorted(os.sched_getaffinity(0))
        return cpu_digest(Path(build.artifact), self.model().path, len(cpus), bench.cpu_mask(cpus))


def _machine() -> str:
    """What makes a build's arithmetic differ between machines: the CPU's ISA (GGML_NATIVE) and the GPU."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        text += "".join(l for l in info.splitlines(True) if l.startswith(("model name", "flags")))[:4000]
    except OSError:
        text += platform.processor()
    if shutil.which("nvidia-smi"):
        text += subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout
    return hashlib.sha256(text.encode()).hexdigest()
