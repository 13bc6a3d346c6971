"""The lab's side of one evaluation: stage, launch the runner in its environment, decide.

Staging copies only the editable files of each tree, so nothing else of a candidate reaches
the build. The seeds are secret: chosen here from the OS, handed to the runner in a file, and
logged only after the verdict. A runner that outlives its timeout is killed with its process
group (TIMEOUT); one that dies without a record is a CRASH with the end of its stderr.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from . import stats
from .envs import Env, Mount
from .harness import Harness, stage_editable, verify_lock
from .records import CRASH, PASS, TIMEOUT, Evaluation, Verdict
from .runner import default_cache

STDERR_TAIL = 3000


@dataclass
class Outcome:
    evaluation: Evaluation
    verdict: Verdict
    record_path: Path
    stderr_tail: str = ""

    @property
    def check_passed(self) -> bool:
        return self.evaluation.check is not None and self.evaluation.check.passed


def secret_seeds(count: int) -> list[int]:
    rng = random.SystemRandom()
    return [rng.getrandbits(63) for _ in range(count)]


def model_fingerprint(harness: Harness) -> dict:
    """The chosen model's identity as a fingerprint field: results on different models differ in
    it and are never compared. Empty while the harness runs its own model."""
    model = harness.model_identity()
    return {"model": model} if model else {}


def run_evaluation(
    harness: Harness,
    candidate_tree: Path,
    work_dir: Path,
    *,
    env: Env,
    incumbent_tree: Path | None = None,
    mode: str = "evaluate",
    delta: float = stats.MIN_DELTA,
    gpu_index: int = 0,
    cpus: list[int] | None = None,
    timeout_s: float | None = None,
    max_seconds: float | None = None,
    min_pairs: int | None = None,
    fingerprint_extra: dict | None = None,
    check_seeds: list[int] | None = None,
) -> Outcome:
    """Evaluate `candidate_tree` (against `incumbent_tree` unless mode is check or aa)."""
    verify_lock(harness)
    work_dir.mkdir(parents=True, exist_ok=True)
    stage = work_dir / "stage"
    candidate_hash = stage_editable(harness, candidate_tree, stage / "candidate")
    extra = {"harness_lock": harness.lock_digest(), "candidate_source": candidate_hash,
             "environment": env.reference(), **model_fingerprint(harness), **(fingerprint_extra or {})}
    if incumbent_tree is not None and mode == "evaluate":
        extra["incumbent_source"] = stage_editable(harness, incumbent_tree, stage / "incumbent")

    seeds_file = work_dir / "seeds.json"
    # Fresh secret seeds, unless a reproduction replays the seeds a bundle recorded.
    seeds = {"check": list(check_seeds) if check_seeds else secret_seeds(harness.oracle_seeds),
             "timing": secret_seeds(1)[0]}
    fd = os.open(seeds_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(seeds, f)

    cache = default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    mounts = {
        "harness": Mount(harness.root, "/lab/harness", read_only=True),
        "stage": Mount(stage, "/lab/stage", read_only=True),
        "work": Mount(work_dir, "/lab/work", read_only=False),
        "cache": Mount(cache, "/cache", read_only=False),
    }
    if harness.model_path is not None:
        mounts["model"] = Mount(harness.model_path.parent, "/lab/model", read_only=True)
    at = {k: env.path_of(m) for k, m in mounts.items()}
    record_path = work_dir / "record.json"
    if record_path.exists():
        record_path.unlink()
    argv = [
        "python", "-m", "lab.runner", "--mode", mode,
        "--harness", at["harness"],
        "--candidate", f"{at['stage']}/candidate",
        "--out", f"{at['work']}/record.json",
        "--seeds-file", f"{at['work']}/seeds.json",
        "--delta", repr(delta), "--gpu-index", str(gpu_index), "--cache", at["cache"],
        "--fingerprint-extra", json.dumps(extra),
    ]
    if mode == "evaluate":
        argv += ["--incumbent", f"{at['stage']}/incumbent"]
    if max_seconds:
        argv += ["--max-seconds", repr(max_seconds)]
    if min_pairs:
        argv += ["--min-pairs", str(min_pairs)]
    if harness.model_path is not None:
        argv += ["--model", f"{at['model']}/{harness.model_path.name}"]

    result = env.run(argv, mounts=list(mounts.values()), timeout_s=timeout_s or harness.timeout_seconds,
                     cpus=cpus, gpus=None)
    tail = (result.stderr or "")[-STDERR_TAIL:]
    if result.timed_out:
        evaluation = Evaluation(harness=harness.name, status=TIMEOUT,
                                reason=f"the runner passed its {timeout_s or harness.timeout_seconds:.0f} s "
                                       "limit and was killed with its process group")
    elif not record_path.exists():
        evaluation = Evaluation(harness=harness.name, status=CRASH,
                                reason=f"the runner exited {result.returncode} without a record: "
                                       + (tail.strip().splitlines() or ["no output"])[-1][:500])
    else:
        evaluation = Evaluation.from_dict(json.loads(record_path.read_text()))
    if not record_path.exists():
        record_path.write_text(evaluation.to_json())
    if mode == "check" and not evaluation.status:
        verdict = Verdict(status=PASS, reason="the oracle passed")
    else:
        verdict = stats.verdict_for(evaluation, delta, speed_of_light_seconds=harness.speed_of_light_seconds)
    return Outcome(evaluation, verdict, record_path, tail)
