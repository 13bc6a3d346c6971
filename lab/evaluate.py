"""The lab's side of one evaluation: stage, launch the runner in its environment, decide.

Staging copies only the editable files of each tree, so nothing else of a candidate reaches
the build. The seeds are secret: chosen here from the OS, handed to the runner in a request file
(with a fresh nonce) that no sandboxed candidate process can see, and logged only after the
verdict. The record comes back on the runner's stdout, framed with that nonce (records.frame),
and is checked against the request (nonce, harness, mode, the staged sources' hashes, the seeds)
before anything reads it; the lab then writes it to the work folder itself, scrubbed. A runner
that outlives its timeout is killed with its process group (TIMEOUT); one that sends no valid
record is a CRASH with the reason.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

from . import progress, stats
from .cache import default_cache
from .envs import Env, Mount
from .harness import Harness, stage_editable, verify_lock
from .records import CRASH, PASS, TIMEOUT, Evaluation, Verdict, unframe
from .scrub import scrub
from .store import atomic_write

STDERR_TAIL = 3000
CONTAINER_WORK = "/lab/work"  # where an evaluation's folder is mounted inside a container
ENV_SANDBOX = "LAB_SANDBOX"  # lab.sandbox.ENV_MODE
# The modes that time nothing, and what their PASS means.
UNTIMED = {"check": "the oracle passed", "build": "the build succeeded", "profile": "the profile ran"}


@dataclass
class Outcome:
    evaluation: Evaluation
    verdict: Verdict
    record_path: Path
    stderr_tail: str = ""


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
    """Evaluate `candidate_tree` (against `incumbent_tree` in mode evaluate). The modes: evaluate,
    aa (the candidate against itself), check (build and oracle), build (build only: the agent's
    compile tool), profile (build, then the harness's profile digest: the agent's profile tool)."""
    verify_lock(harness)
    work_dir.mkdir(parents=True, exist_ok=True)
    stage = work_dir / "stage"
    candidate_hash = stage_editable(harness, candidate_tree, stage / "candidate")
    extra = {"harness_lock": harness.lock_digest(), "candidate_source": candidate_hash,
             "environment": env.reference(), **model_fingerprint(harness), **(fingerprint_extra or {})}
    if incumbent_tree is not None and mode == "evaluate":
        extra["incumbent_source"] = stage_editable(harness, incumbent_tree, stage / "incumbent")
    request = write_request(work_dir / "request.json", harness, check_seeds)
    mounts = runner_mounts(harness, stage, work_dir)
    record_path = work_dir / "record.json"
    if record_path.exists():
        record_path.unlink()
    argv = runner_argv(harness, {k: env.path_of(m) for k, m in mounts.items()}, mode=mode, delta=delta,
                       gpu_index=gpu_index, extra=extra, max_seconds=max_seconds, min_pairs=min_pairs)
    limit = timeout_s or harness.timeout_seconds
    result = env.run(argv, mounts=list(mounts.values()), timeout_s=limit, cpus=cpus, gpus=None,
                     env={ENV_SANDBOX: request["sandbox"]}, on_line=progress.relay)
    tail = scrub((result.stderr or "")[-STDERR_TAIL:])
    if result.timed_out:
        evaluation = Evaluation(harness=harness.name, status=TIMEOUT,
                                reason=f"the runner passed its {limit:.0f} s "
                                       "limit and was killed with its process group")
    else:
        evaluation = received_record(result.stdout or "", request, harness, mode, extra)
        if evaluation is None:
            evaluation = Evaluation(harness=harness.name, status=CRASH,
                                    reason=f"the runner exited {result.returncode} without a record: "
                                           + (tail.strip().splitlines() or ["no output"])[-1][:500])
    atomic_write(record_path, evaluation.to_json())  # the lab's own copy, scrubbed
    if mode in UNTIMED and not evaluation.status:
        verdict = Verdict(status=PASS, reason=UNTIMED[mode])
    else:
        verdict = stats.verdict_for(evaluation, delta, speed_of_light_seconds=harness.speed_of_light_seconds)
    return Outcome(evaluation, verdict, record_path, tail)


def write_request(path: Path, harness: Harness, check_seeds: list[int] | None) -> dict:
    """The runner's request (its nonce, the sandbox choice, the seeds), readable by this user only.
    Fresh secret seeds, unless a reproduction replays the seeds a bundle recorded."""
    request = {"nonce": secrets.token_hex(16), "sandbox": sandbox_env()[ENV_SANDBOX],
               "check": list(check_seeds) if check_seeds else secret_seeds(harness.oracle_seeds),
               "timing": secret_seeds(1)[0]}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(request, f)
    return request


def runner_mounts(harness: Harness, stage: Path, work_dir: Path) -> dict[str, Mount]:
    """What the runner sees: the harness and the staged sources read-only, its work folder and
    the cache writable, the chosen model file's folder read-only."""
    cache = default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    mounts = {
        "harness": Mount(harness.root, "/lab/harness", read_only=True),
        "stage": Mount(stage, "/lab/stage", read_only=True),
        "work": Mount(work_dir, CONTAINER_WORK, read_only=False),
        "cache": Mount(cache, "/cache", read_only=False),
    }
    if harness.model_path is not None:
        mounts["model"] = Mount(harness.model_path.parent, "/lab/model", read_only=True)
    return mounts


def runner_argv(harness: Harness, at: dict[str, str], *, mode: str, delta: float, gpu_index: int, extra: dict,
                max_seconds: float | None, min_pairs: int | None) -> list[str]:
    """`python -m lab.runner ...` with the paths as the environment shows them (`at`: mount -> path)."""
    argv = [
        "python", "-m", "lab.runner", "--mode", mode,
        "--harness", at["harness"],
        "--candidate", f"{at['stage']}/candidate",
        "--request", f"{at['work']}/request.json",
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
    return argv


def sandbox_env() -> dict:
    """What the runner must know of the user's choice: LAB_SANDBOX=off for --no-sandbox."""
    from . import sandbox

    return {sandbox.ENV_MODE: sandbox.mode()}


def received_record(stdout: str, request: dict, harness: Harness, mode: str, extra: dict) -> Evaluation | None:
    """The runner's record, if `stdout` holds exactly one intact frame with the request's nonce;
    a record that does not answer the request (another harness, mode, source or seeds) becomes a
    CRASH saying so. None when there is no record at all."""
    text = unframe(stdout, request["nonce"])
    if text is None:
        return None
    text = scrub(text)  # whatever came from the candidate (errors, check lines) is free of secrets from here on
    try:
        evaluation = Evaluation.from_dict(json.loads(text))
    except (ValueError, TypeError, AttributeError) as exc:
        return Evaluation(harness=harness.name, status=CRASH, reason=f"the runner's record is malformed ({exc})"[:500])
    problems = record_problems(evaluation, request, harness.name, mode, extra)
    if problems:
        return Evaluation(harness=harness.name, status=CRASH,
                          reason="the runner's record does not answer the lab's request: " + "; ".join(problems))
    return evaluation


def record_problems(ev: Evaluation, request: dict, harness_name: str, mode: str, extra: dict) -> list[str]:
    """How a record differs from the evaluation the lab asked for (empty: it answers it)."""
    problems = []
    if ev.nonce != request["nonce"]:
        problems.append("another nonce")
    if ev.harness != harness_name:
        problems.append(f"harness {ev.harness!r}, asked {harness_name!r}")
    if ev.mode != mode:
        problems.append(f"mode {ev.mode!r}, asked {mode!r}")
    seeds = list(request["check"]) + [request["timing"]]
    if ev.seeds != seeds:
        problems.append("other seeds than the lab's")
    for side, build, key in (("candidate", ev.candidate_build, "candidate_source"),
                             ("incumbent", None if mode == "aa" else ev.incumbent_build, "incumbent_source")):
        if build is not None and key in extra and build.source_hash != extra[key]:
            problems.append(f"the {side} built from another source than the one staged")
    isolation = str(ev.fingerprint.get("sandbox", ""))
    if request.get("sandbox") == "bwrap" and (ev.candidate_build or ev.pairs) and not isolation.startswith("bubblewrap"):
        problems.append(f"candidate code ran without the sandbox asked for ({isolation or 'not said'})")
    if ev.pairs and (ev.candidate_build is None or ev.incumbent_build is None):
        problems.append("timed pairs without builds")
    if ev.check is not None and ev.candidate_build is None:
        problems.append("a check without a build")
    return problems
