"""MLX inference: the generation pipeline of an mlx-lm model, end to end.

The agent edits inference.py only (interface.md is its contract). Every other file is locked:
this one (the harness), driver.py (workload, prompts, worker processes, the clock), worker.py
(the process that imports a pipeline), oracle.py and spec.py (the quality gates and the
sampler they hold pipelines to), reference.py (the pristine pipeline), model.py (which model,
built or fetched, hashed) and corpus.txt.

A pipeline never runs in this process. Each side of a comparison gets a worker process,
sandboxed (driver.py: its files read-only, one scratch folder, no view of the lab or of other
processes; every process of its sandbox frozen while the other side is timed); the harness writes
a request, reads the answer, and times the interval on its own clock. The metric
is generation tokens/s of one fixed unit (64 prompt + 64 sampled tokens, prompt processing
included); prompt tokens/s, decode tokens/s and peak memory go into each sample's detail and
never into the verdict. Every timed unit's tokens are checked against the sampler spec on the
reference model's logits before the sample counts.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from lab.sdk import (Build, Check, CheckItem, Environment, Harness, Metric, MissingExtra, Sample, default_cache,
                     require, sha256_file)

from . import driver, oracle
from . import model as models
from .driver import Worker, WorkerError

PIPELINE = "inference.py"
REFERENCE = "reference.py"
WARMUP_SEED = 1


def _cache() -> Path:
    return default_cache()


def software() -> dict:
    """Versions of the packages a pipeline runs on: part of the reference's cache key and of
    every build record."""
    out = {"python": platform.python_version(), "system": platform.system(), "machine": platform.machine()}
    for dist in ("mlx", "mlx-metal", "mlx-cpu", "mlx-cuda", "mlx-cuda-12", "mlx-cuda-13", "mlx-lm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Loaded:
    worker: Worker
    warmed: bool = False


class MLXInference(Harness):
    name = "mlx"
    # one of mlx-cpu / mlx-metal / mlx-cuda-13 is there; the tokenizer packages shape the offline model
    software = ("mlx", "mlx-lm", "mlx-cpu", "mlx-metal", "mlx-cuda-13", "tokenizers", "transformers")
    description = ("mlx-lm generation pipeline (KV cache, prefill, sampler, decode loop) of one model; "
                   "64 prompt + 64 sampled tokens per unit, temperature 0.7, top-p 0.9")
    metric = Metric("generation_tps", "tokens/s", higher_is_better=True)
    editable = (PIPELINE,)
    environment = Environment(dockerfile="Dockerfile.cpu", nix_shell=".#cpu", needs_gpu=False)
    timeout_seconds = 600.0
    min_pairs = 20
    min_timing_seconds = 3.0
    max_timing_seconds = 20.0
    oracle_seeds = 2

    def __init__(self, root: Path):
        super().__init__(root)
        self._reference_worker: Worker | None = None
        self._timed: list[Worker] = []  # the workers of load(), until unload()
        self._corpus_ids: list[int] | None = None
        self._logit_eps: float | None = None
        atexit.register(self.close)

    # --- environment ---------------------------------------------------------------------------
    def preflight(self) -> None:
        require("mlx.core")
        if importlib.util.find_spec("mlx_lm") is None:
            raise MissingExtra("mlx_lm", "mlx")
        models.check_choice()

    def model(self) -> models.ModelInfo:
        return models.resolve(str(_cache()))

    def workload(self) -> dict:
        return {"prompt_tokens": driver.PROMPT_TOKENS, "generated_tokens": driver.GENERATED_TOKENS,
                "temperature": driver.TEMPERATURE, "top_p": driver.TOP_P}

    # --- build ---------------------------------------------------------------------------------
    def build(self, src: Path, out: Path) -> Build:
        """The pipeline is Python: the build copies it and compiles it to catch syntax errors;
        it records the model and the software it will run on."""
        source = Path(src) / PIPELINE
        artifact = Path(out) / PIPELINE
        shutil.copyfile(source, artifact)
        info = {**software(), **self.model().record()}
        try:
            compile(artifact.read_bytes(), PIPELINE, "exec")
        except SyntaxError as exc:
            return Build(ok=False, source_hash="", error=f"{PIPELINE}:{exc.lineno}: {exc.msg}", info=info)
        return Build(ok=True, source_hash="", artifact=str(artifact), artifact_sha256=sha256_file(artifact),
                     info=info)

    # --- the reference -------------------------------------------------------------------------
    def _start_reference(self) -> Worker:
        """The reference worker, started if need be without waiting, so that it loads alongside
        a candidate's."""
        if self._reference_worker is None or self._reference_worker.proc.poll() is not None:
            self._reference_worker = Worker(self.root / REFERENCE, self.model().path, reference=True,
                                            label="reference")
        return self._reference_worker

    def _reference_ready(self) -> Worker:
        worker = self._start_reference()
        worker.wait_ready()
        return worker

    def reference(self, corpus: list[int]) -> oracle.Reference:
        info = self.model()
        key = oracle.cache_key(self.lock_digest(), info.sha256, software())
        return oracle.reference(_cache() / "mlx" / "reference" / key, self._reference_ready, corpus)

    def close(self) -> None:
        if self._reference_worker is not None:
            self._reference_worker.close()
            self._reference_worker = None

    # --- check ---------------------------------------------------------------------------------
    def check(self, build: Build, seeds: list[int]) -> Check:
        info = self.model()
        corpus = self._corpus()
        self._start_reference()
        candidate = Worker(Path(build.artifact), info.path, label="candidate")
        model_item = CheckItem("model", True, {"name": info.name, "sha256": info.sha256})
        try:
            ref = self.reference(corpus)
            try:
                candidate.wait_ready()
            except WorkerError as exc:
                return Check(passed=False, items=[model_item, CheckItem("load", False, detail=str(exc)[-1500:])],
                             lines=[f"load: FAIL ({str(exc)[-300:]})"])
            check = oracle.run(candidate, self._reference_ready, ref, corpus, list(seeds))
        finally:
            candidate.close()
        check.items.insert(0, model_item)
        check.lines.insert(0, f"model: {info.name} ({info.sha256[:12]}), reference on {ref.device}")
        return check

    # --- timing --------------------------------------------------------------------------------
    def load(self, build: Build) -> Loaded:
        """Start the worker; it loads while the other side's does. The first sample waits for it."""
        self._start_reference()
        worker = Worker(Path(build.artifact), self.model().path, label="timed")
        self._timed.append(worker)
        return Loaded(worker)

    def _run_only(self, worker: Worker) -> None:
        """Freeze every other worker of this harness and let `worker` run (see Worker.pause)."""
        for other in [*self._timed, self._reference_worker]:
            if other is not None and other is not worker:
                other.pause()
        worker.resume()

    def sample(self, loaded: Loaded, seed: int) -> Sample:
        corpus = self._corpus()
        eps = self._eps()
        loaded.worker.wait_ready()
        self._run_only(loaded.worker)
        if not loaded.warmed:  # not timed: imports, first allocations, lazy initialisation
            driver.generate(loaded.worker, driver.seeded_prompt(corpus, WARMUP_SEED, driver.PROMPT_TOKENS),
                            driver.GENERATED_TOKENS, driver.TEMPERATURE, driver.TOP_P, WARMUP_SEED)
            loaded.warmed = True
        prompt = driver.seeded_prompt(corpus, seed, driver.PROMPT_TOKENS)
        sampler_seed = driver.derive(seed, "sampler")
        n = driver.GENERATED_TOKENS
        answer = driver.generate(loaded.worker, prompt, n, driver.TEMPERATURE, driver.TOP_P, sampler_seed)
        reference = self._reference_ready()
        self._run_only(reference)
        tokens = answer.data.get("tokens")
        problems = []
        count = len(tokens) if isinstance(tokens, list) else 0
        if count != n or not all(isinstance(t, int) for t in tokens):
            problems.append(f"returned {count} tokens, asked for {n}")
        else:
            report = driver.verify(reference, prompt, tokens, driver.TEMPERATURE, driver.TOP_P, sampler_seed, eps)
            if not report["ok"]:
                problems.append("timed tokens differ from the spec: " + oracle.stream_detail(report))
        seconds = answer.seconds
        detail = _rates(answer, len(prompt), count)
        return Sample(seconds=seconds, value=n / seconds, ok=not problems, wall_seconds=answer.wall_seconds,
                      work={"prompt_tokens": len(prompt), "generated_tokens": count},
                      detail="; ".join(problems + [detail]))

    def unload(self, loaded: Loaded) -> None:
        loaded.worker.close()
        self._timed = [w for w in self._timed if w is not loaded.worker]

    def _corpus(self) -> list[int]:
        if self._corpus_ids is None:
            self._corpus_ids = models.corpus_ids(self.model())
        return self._corpus_ids

    def _eps(self) -> float:
        if self._logit_eps is None:
            self._logit_eps = self.reference(self._corpus()).bounds["logits_max_abs"]
        return self._logit_eps

    # --- profile (never feeds a verdict) -------------------------------------------------------
    def profile(self, build: Build) -> str:
        corpus = self._corpus()
        worker = Worker(Path(build.artifact), self.model().path, label="profile")
        try:
            worker.wait_ready()
            lines = [f"model {self.model().name}, device {worker.ready.get('device')}, "
                     f"load() {worker.ready.get('load_seconds', 0):.2f} s"]
            for i in range(4):
                prompt = driver.seeded_prompt(corpus, 1000 + i, driver.PROMPT_TOKENS)
                answer = driver.generate(worker, prompt, driver.GENERATED_TOKENS, driver.TEMPERATURE,
                                         driver.TOP_P, 1000 + i)
                lines.append(f"unit {i}{' (warm-up)' if i == 0 else ''}: {answer.seconds * 1e3:.1f} ms, "
                             + _rates(answer, len(prompt), len(answer.data.get('tokens', []))))
            return "\n".join(lines)
        except WorkerError as exc:
            return f"profile failed: {exc}"
        finally:
            worker.close()


def _rates(answer: driver.Answer, prompt_tokens: int, generated: int) -> str:
    """Prompt and decode rates on the driver's clock, and the worker's own peak-memory report."""
    parts = []
    first = answer.first_seconds
    if first and 0 < first < answer.seconds and generated > 1:
        parts += [f"ttft_s={first:.4f}", f"prompt_tps={prompt_tokens / first:.1f}",
                  f"decode_tps={(generated - 1) / (answer.seconds - first):.1f}"]
    peak = answer.data.get("peak_memory")
    if isinstance(peak, (int, float)):
        parts.append(f"peak_memory_mb={peak / 1e6:.2f} (worker-reported)")
    return " ".join(parts)
