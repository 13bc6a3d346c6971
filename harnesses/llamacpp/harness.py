"""llama.cpp token generation: 64 greedy tokens of Gemma 3 270M Q4_K_M after a secret prompt,
CPU backend (CUDA where a GPU is).

The agent edits the ggml CPU and CUDA backends of a pinned llama.cpp tree
(`ggml/src/ggml-cpu/**`, `ggml/src/ggml-cuda/**`); every other file of the tree, and every file
of this folder, is locked. The harness builds the tools, and its own driver (driver.cpp), with
its own CMake flags from the pinned tree plus the staged editable files (build.py), checks a build
against the pristine build of the same tree (oracle.py), and times one unit per sample: one
sandboxed driver process that generates 64 greedy tokens from a secret prompt, timed on the
harness's clock and verified token by token against the pristine build's logits before its time
counts (driver.py). The oracle's greedy check runs the same driver the same way, so the timed run
is the checked run. llama-bench's tg128 is still measured once per check, beside the verdict, as
the familiar figure; no verdict rests on it. Candidate code never runs in the harness's process,
and every process that compiles or runs it is sandboxed (lab/sandbox.py). Notes for the agent:
program.md.

`--model PATH` (on the lab's commands that evaluate) runs another GGUF model; LAB_LLAMACPP_BACKEND=cpu|cuda
overrides the backend (default: cuda when nvidia-smi sees a GPU and nvcc is there, else cpu);
LAB_LLAMACPP_SOURCE=auto|git|sdist and LAB_LLAMACPP_GIT_URL choose where the pinned tree comes
from (source.py).
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lab.sdk import (Build, Check, CheckItem, Environment, EnvironmentUnavailable, Harness, Metric, Sample,
                     build_cached, default_cache, progress)

from . import bench, build as builder, driver, model as models, oracle, source
from .profile import cpu_digest, cuda_digest

EDITABLE_ROOTS = ("ggml/src/ggml-cpu", "ggml/src/ggml-cuda")
SOURCE_SUFFIXES = (".c", ".cpp", ".h", ".hpp", ".inc", ".cu", ".cuh")  # what compilers read, nothing they run
TIMING_THREADS = 1  # lab.runner pins the timing to one core (choose_timing_cpus(1)); the oracle's probes match it
ENV_BACKEND = "LAB_LLAMACPP_BACKEND"


@dataclass
class Loaded:
    bindir: Path
    command: list[str]  # the driver's argv inside its sandbox
    threads: int
    box: object  # lab.sandbox.Sandbox


class LlamaCpp(Harness):
    name = "llamacpp"
    description = ("llama.cpp generation (a secret 12-24-word prompt, then 64 greedy tokens, batch 1, every "
                   "token checked) of Gemma 3 270M Q4_K_M; editable: the ggml CPU and CUDA backends of "
                   "llama.cpp 0c1e57098")
    metric = Metric("gen64_tps", "tokens/s", higher_is_better=True)
    editable = tuple(f"{root}/**" for root in EDITABLE_ROOTS)
    # The first build of a fresh machine compiles the whole tree (~5-10 min on 2 cores).
    timeout_seconds = 1800.0
    min_pairs = 20
    min_timing_seconds = 0.0
    max_timing_seconds = 180.0  # a pair is two driver processes: ~5 s on 2 quiet cores, 8+ s on busy ones
    oracle_seeds = 2
    model_help = "a GGUF model file"

    def is_editable(self, relpath: str) -> bool:
        """The backends' C, C++ and CUDA sources only, not their build files or scripts: CMake runs
        what a CMakeLists.txt or a .cmake file says while the shared build folder and the
        compiler cache are writable, so a candidate that could edit one could plant objects for
        every later build. Sources only compile; none of a candidate's code runs at build time."""
        return super().is_editable(relpath) and relpath.endswith(SOURCE_SUFFIXES)

    def __init__(self, root: Path):
        super().__init__(root)
        cuda = self.backend == "cuda"
        self.environment = Environment(dockerfile="Dockerfile.cuda" if cuda else "Dockerfile.cpu",
                                       nix_shell=".#cuda" if cuda else ".#cpu", needs_gpu=cuda)
        self._scorers: dict = {}  # (pristine artifact, threads) -> driver.Scorer
        atexit.register(self.close)

    # --- where things live ---------------------------------------------------------------------
    @property
    def home(self) -> Path:
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
        return driver.N_GEN * size / bench.MAX_BANDWIDTH[self.backend]

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
        # The probes run exactly as a timed sample: the runner times on one pinned core, so one
        # thread, and the argv is the timed one down to the thread count.
        threads = TIMING_THREADS
        result = oracle.run(oracle.Tools(Path(build.artifact), model.path, self.backend), reference, list(seeds),
                            changed=build.info.get("changed_files", []),
                            greedy=lambda seed: self._unit(self.load(build, threads), seed, base))
        if result.passed:
            progress.stage("llama.cpp: llama-bench tg128 of candidate and baseline (informational)")
            item, line = self._llama_bench(build, base)
            result.items.append(item)
            result.lines.insert(len(result.lines) - 1, line)
        result.lines.insert(0, f"model {model.path.name} ({model.architecture}, sha256 {model.sha256[:12]}...), "
                               f"llama.cpp {source.COMMIT}, backend {self.flavor.backend}{self.flavor.cuda_arch}")
        for item in result.items:
            item.values.setdefault("model_sha256", model.sha256)
        return result

    def _llama_bench(self, build: Build, base: Build) -> tuple[CheckItem, str]:
        """llama-bench's tg128 of the candidate and the baseline: the familiar figure, reported
        beside the verdict and never part of it (nothing llama-bench generates is checked)."""
        cpus = sorted(os.sched_getaffinity(0))
        gpu = self.backend == "cuda"
        values = {}
        for side, b in (("candidate", build), ("baseline", base)):
            bindir, model = Path(b.artifact), self.model().path
            box = driver.box(bindir, model, gpu=gpu)
            cmd = bench.command(box.path(bindir / "llama-bench"), box.path(model), backend=self.backend,
                                threads=len(cpus), cpu_mask=bench.cpu_mask(cpus))
            got = bench.run(box, cmd, threads=len(cpus), min_seconds=0.0, build_commit=source.COMMIT, gpu=gpu)
            values[f"{side}_tps"] = got.value if got.ok else None
        shown = " / ".join(f"{v:.1f}" if v else "failed" for v in values.values())
        line = (f"llama-bench tg128 (informational; its tokens are not checked and no verdict rests on it): "
                f"candidate / baseline {shown} tokens/s, one repetition each, {len(cpus)} threads")
        return CheckItem("llama_bench_tg128", True, values, "informational"), line

    def _reference_key(self, model: models.Model, base: Build) -> str:
        """The baseline's answers hold for one machine (ISA, GPU), model and pristine binary."""
        parts = [source.TREE_HASH, self.flavor.key, model.sha256, base.artifact_sha256, _machine()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]

    # --- timing --------------------------------------------------------------------------------
    def load(self, build: Build, threads: int | None = None) -> Loaded:
        """The driver's sandbox and argv for `build`; threads: one per core this process may use
        (the cores the runner pinned the timing to)."""
        threads = threads or len(os.sched_getaffinity(0))
        bindir = Path(build.artifact)
        model = self.model().path
        box = driver.box(bindir, model, gpu=self.backend == "cuda")
        cmd = driver.argv(box, bindir, model, threads=threads, gpu_layers=99 if self.backend == "cuda" else 0)
        return Loaded(bindir=bindir, command=cmd, threads=threads, box=box)

    def sample(self, loaded: Loaded, seed: int) -> Sample:
        """One unit: the secret prompt of `seed`, 64 greedy tokens, timed by this process and
        verified against the pristine build before the time counts."""
        return self._unit(loaded, seed, self.baseline())

    def _unit(self, loaded: Loaded, seed: int, base: Build) -> Sample:
        text = driver.prompt(oracle.corpus_words(), seed)
        work = {"n_gen": driver.N_GEN, "threads": loaded.threads}
        try:
            answer = driver.run_once(loaded.box, loaded.command, text, gpu=self.backend == "cuda")
            scored = self._scorer(base, loaded.threads).score(text, answer.tokens)
        except driver.DriverFailed as exc:
            return Sample(seconds=math.nan, value=0.0, ok=False, work=work, detail=str(exc)[:500])
        problems = driver.verify(answer, scored)
        floor = self.speed_of_light_seconds or 0.0
        if answer.seconds < floor:
            problems.append(f"{driver.N_GEN} tokens in {answer.seconds:.4g} s is faster than the memory "
                            f"bandwidth allows (floor {floor:.4g} s)")
        if not answer.reported_s <= answer.seconds + driver.REPORT_SLACK_S:
            problems.append(f"the driver reports {answer.reported_s:.4g} s of work inside the "
                            f"{answer.seconds:.4g} s the harness timed")
        work = {**work, "n_prompt": answer.n_prompt, "generated": len(answer.tokens)}
        detail = "; ".join(problems) or (f"prompt {answer.n_prompt} tokens; driver-reported "
                                         f"{answer.reported_s:.4f} s; final logits {answer.final.get('fnv1a')}")
        return Sample(seconds=answer.seconds, value=driver.N_GEN / answer.seconds, ok=not problems,
                      wall_seconds=answer.process_seconds, work=work, detail=detail[:1500])

    def _scorer(self, base: Build, threads: int) -> driver.Scorer:
        key = (base.artifact, threads)
        scorer = self._scorers.get(key)
        if scorer is None or scorer.proc.poll() is not None:
            bindir, model = Path(base.artifact), self.model().path
            box = driver.box(bindir, model, gpu=self.backend == "cuda")
            scorer = driver.Scorer(box, driver.argv(box, bindir, model, threads=threads,
                                                    gpu_layers=99 if self.backend == "cuda" else 0, score=True),
                                   gpu=self.backend == "cuda")
            self._scorers[key] = scorer
        return scorer

    def close(self) -> None:
        for scorer in self._scorers.values():
            scorer.close()
        self._scorers.clear()

    def workload(self) -> dict:
        """The fixed work; each Sample's counters add the threads (the cores the runner pins the
        timing to, known only then) and the prompt's token count (12-24 words, secret)."""
        return {"n_gen": driver.N_GEN, "prompt_words": list(driver.PROMPT_WORDS)}

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
        text += "".join(line for line in info.splitlines(True) if line.startswith(("model name", "flags")))[:4000]
    except OSError:
        text += platform.processor()
    if shutil.which("nvidia-smi"):
        text += subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout
    return hashlib.sha256(text.encode()).hexdigest()
