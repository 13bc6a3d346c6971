"""The process that runs inside the harness's environment: build, check, paired timing, JSON out.

    python -m lab.runner --harness DIR --incumbent STAGE --candidate STAGE \
        --request REQUEST.json [--mode evaluate|check|aa|build|profile] [--delta 0.005]

It loads the harness from its locked folder (verified against lock.json), builds the staged
editable files of both sides (cached by content hash), runs the oracle on the candidate with the
secret seeds, then times incumbent and candidate in interleaved pairs, in random order within
each pair, on the same fresh inputs, with GPU telemetry per block of pairs, until the paired CI
is narrow enough or the time budget ends. It decides nothing: the verdict is the lab's
(lab/stats.py).

The record goes back over the runner's own stdout, framed with the request's nonce
(`records.frame`), never through a file: at start the runner keeps a private, non-inheritable
copy of fd 1 for the record and points fd 1 at stderr, so no child (a compiler, a candidate's
worker) can write into the channel; candidate code runs in lab.sandbox, where it sees neither
the request file (seeds, nonce) nor this process. The lab checks the record against what it asked
for (lab/evaluate.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from . import progress
from .cache import build_cached, default_cache
from .errors import CandidateAborted
from .errors import summary as _summary
from .harness import Harness, load, verify_lock
from .records import CRASH, FAIL, Build, Check, CheckItem, Evaluation, Pair, TelemetryBlock, frame
from .system.process import place_self

PAIRS_PER_BLOCK = 5  # telemetry granularity: a throttled block drops this many pairs at most


# --- the paired timing -------------------------------------------------------------------------
def time_pairs(harness: Harness, incumbent: Build, candidate: Build, *, seed: int, delta: float,
               min_pairs: int, min_seconds: float, max_seconds: float, telemetry=None,
               progress=None) -> tuple[list[Pair], list[TelemetryBlock], float]:
    """Interleave incumbent and candidate samples until the stop rule says enough."""
    from . import stats  # numpy: imported here so that `--help` stays fast

    rng = random.Random(seed)
    rotate = harness.rotate_placement
    # Two loads even for an A/A (candidate is incumbent): the noise floor and the canaries must
    # see whatever differs between two loads of one build, as every real comparison does.
    loaded = _load_pair(harness, incumbent, candidate, a_first=True)
    pairs: list[Pair] = []
    blocks: list[TelemetryBlock] = []
    try:
        # One throw-away sample of each: module load, first-touch and clocks ramp stay out.
        _warm(harness, loaded, rng.getrandbits(63))
        start = time.monotonic()
        block_index = 0
        while True:
            a_first = block_index % 2 == 0 if rotate else True
            if rotate and block_index > 0:
                _unload_pair(harness, loaded)  # empties `loaded`: a failing load below leaves nothing to unload
                loaded = _load_pair(harness, incumbent, candidate, a_first=a_first)
                _warm(harness, loaded, rng.getrandbits(63))
            loaded_a, loaded_b = loaded["A"], loaded["B"]
            ctx = telemetry.block(block_index) if telemetry is not None else nullcontext()
            with ctx as monitor:
                for _ in range(PAIRS_PER_BLOCK):
                    sample_seed = rng.getrandbits(63)  # both sides get the same fresh inputs
                    order = rng.choice(("AB", "BA"))
                    if order == "AB":
                        a = harness.sample(loaded_a, sample_seed)
                        b = harness.sample(loaded_b, sample_seed)
                    else:
                        b = harness.sample(loaded_b, sample_seed)
                        a = harness.sample(loaded_a, sample_seed)
                    pairs.append(Pair(index=len(pairs), order=order, incumbent=a, candidate=b,
                                      block=block_index, loaded_first="A" if a_first else "B"))
                    if (len(pairs) >= min_pairs and time.monotonic() - start >= max_seconds
                            and not (rotate and block_index % 2 == 0)):
                        # The budget is spent: the block ends here rather than overrun it by up to
                        # PAIRS_PER_BLOCK - 1 samples (half a minute of llama.cpp on a CPU). A
                        # rotating harness ends only in a B-first block, as the stop rule below.
                        break
            if telemetry is not None:
                blocks.append(getattr(monitor, "result", None) or TelemetryBlock(index=block_index))
            block_index += 1
            elapsed = time.monotonic() - start
            if progress:
                progress(len(pairs), elapsed)
            if any(not (p.incumbent.ok and p.candidate.ok) for p in pairs):
                break  # a wrong timed output ends the timing: the verdict is FAIL already
            if rotate and block_index % 2:
                continue  # stop only after as many blocks with A first as with B first
            ratios = stats.log_ratios(pairs)
            if stats.should_stop(ratios, delta, elapsed_s=elapsed, min_pairs=min_pairs,
                                 min_seconds=min_seconds, max_seconds=max_seconds):
                break
        return pairs, blocks, time.monotonic() - start
    finally:
        _unload_pair(harness, loaded)


def _load_pair(harness: Harness, incumbent: Build, candidate: Build, a_first: bool) -> dict:
    """Both sides loaded, the one named first allocated first: {"A": incumbent, "B": candidate}."""
    order = (("A", incumbent), ("B", candidate)) if a_first else (("B", candidate), ("A", incumbent))
    loaded: dict = {}
    try:
        for side, build in order:
            loaded[side] = harness.load(build)
    except BaseException:
        _unload_pair(harness, loaded)
        raise
    return loaded


def _unload_pair(harness: Harness, loaded: dict) -> None:
    for side in list(loaded):
        harness.unload(loaded.pop(side))


def _warm(harness: Harness, loaded: dict, seed: int) -> None:
    harness.sample(loaded["A"], seed)
    harness.sample(loaded["B"], seed)


def _timing_cpus(harness: Harness, gpu_index: int) -> tuple[list[int], list[int]]:
    """Pin this process, for the timing only, to a core on the GPU's NUMA node, apart from the
    cores where builds, the lab and the agent run; return (the cores, those already busy).
    Builds and the oracle ran before, unpinned, on the rest."""
    from .system import cpus

    node = None
    if harness.environment.needs_gpu:
        from .system.telemetry import device_handle, numa_node, open_nvml

        nvml = open_nvml()
        node = numa_node(nvml, device_handle(nvml, gpu_index)) if nvml is not None else None
    chosen = cpus.choose_timing_cpus(1, node=node)
    busy = cpus.busy_cpus(chosen)
    cpus.pin(chosen)
    return chosen, busy


def _telemetry_for(harness: Harness, gpu_index: int):
    if not harness.environment.needs_gpu:
        return None
    try:
        from .system.telemetry import GpuTelemetry

        return GpuTelemetry(gpu_index)
    except Exception:  # telemetry is a record, never a reason to stop measuring
        return None


# --- one evaluation ---------------------------------------------------------------------------
def evaluate(args) -> Evaluation:
    """One evaluation as `args.mode` asks (build, profile, check, aa, evaluate): the record of its
    steps up to the first that fails or the last the mode asks for."""
    from . import sandbox

    started = time.monotonic()
    sandbox.check_available()  # no sandbox and no --no-sandbox: refuse, with what to do
    harness = load(args.harness, model=args.model)
    verify_lock(harness)
    request = _request(args)
    check_seeds = request.get("check") or [random.SystemRandom().getrandbits(63) for _ in range(harness.oracle_seeds)]
    timing_seed = request.get("timing") or random.SystemRandom().getrandbits(63)
    record = Evaluation(harness=harness.name, seeds=list(check_seeds) + [timing_seed],
                        work=harness.workload(), nonce=request.get("nonce", ""), mode=args.mode)
    _run_steps(harness, record, args, check_seeds, timing_seed)
    return _finish(record, started)


def _run_steps(harness: Harness, record: Evaluation, args, check_seeds: list[int], timing_seed: int) -> None:
    """Build the candidate, then profile it or check it, build the incumbent and time the pair; a
    step that fails writes its status and reason into `record` and ends the evaluation there."""
    cache = Path(args.cache) if args.cache else default_cache()
    say = progress.stage  # to the lab, which shows it as it comes

    say("building the candidate")
    record.candidate_build = build_cached(harness, Path(args.candidate), cache)
    if not record.candidate_build.ok:
        record.status, record.reason = FAIL, "build failed: " + record.candidate_build.error[-1500:]
        return
    if args.mode == "build":  # the agent's compile tool
        return
    if args.mode == "profile":  # the agent's profile tool: informative, never a verdict
        _profile(harness, record, say)
        return
    if args.mode in ("evaluate", "check", "aa"):  # the A/A baseline is checked too
        if not _check(harness, record, check_seeds, args.mode, say) or args.mode == "check":
            return
    if args.mode == "aa":
        record.incumbent_build = record.candidate_build
    elif not _build_incumbent(harness, record, Path(args.incumbent), cache, say):
        return
    _run_timing(harness, record, args, timing_seed, say)


def _check(harness: Harness, record: Evaluation, check_seeds: list[int], mode: str, say) -> bool:
    """The oracle on the candidate build (the incumbent's, for an A/A) with the secret seeds; True
    when it passed. An oracle that crashes is a failed check."""
    say(f"checking the {'incumbent' if mode == 'aa' else 'candidate'} with the oracle "
        f"({len(check_seeds)} secret seeds)")
    t0 = time.monotonic()
    try:
        record.check = harness.check(record.candidate_build, list(check_seeds))
    except CandidateAborted:
        raise
    except Exception as exc:
        record.check = Check(passed=False, items=[CheckItem("oracle", False, detail="crashed: " + _summary(exc))])
    record.check.seconds = record.check.seconds or time.monotonic() - t0
    if not record.check.passed:
        record.status, record.reason = FAIL, "oracle: " + "; ".join(record.check.failures())[:1500]
    return record.check.passed


def _build_incumbent(harness: Harness, record: Evaluation, stage: Path, cache: Path, say) -> bool:
    """The incumbent's build into `record`; True when it built (one that no longer builds is a
    CRASH, not the candidate's FAIL)."""
    say("building the incumbent")
    record.incumbent_build = build_cached(harness, stage, cache)
    if not record.incumbent_build.ok:
        record.status, record.reason = CRASH, "the incumbent no longer builds: " + record.incumbent_build.error[-1500:]
    return record.incumbent_build.ok


def _run_timing(harness: Harness, record: Evaluation, args, timing_seed: int, say) -> None:
    """The paired timing of the two builds on a pinned core, into `record`; a timing that crashes
    is a CRASH."""
    record.timing_cpus, record.busy_cpus = _timing_cpus(harness, args.gpu_index)
    min_pairs = args.min_pairs or harness.min_pairs
    max_seconds = args.max_seconds or harness.max_timing_seconds
    say(f"timing in interleaved pairs on CPU {record.timing_cpus}: at least {min_pairs} pairs, "
        f"until the CI is narrow or {max_seconds:.0f} s have passed"
        + (f" (busy before timing: {record.busy_cpus})" if record.busy_cpus else ""))
    try:
        candidate = record.incumbent_build if args.mode == "aa" else record.candidate_build
        record.pairs, record.telemetry, record.timing_seconds = time_pairs(
            harness, record.incumbent_build, candidate, seed=timing_seed, delta=args.delta,
            min_pairs=min_pairs,
            min_seconds=harness.min_timing_seconds if args.min_seconds is None else args.min_seconds,
            max_seconds=max_seconds,
            telemetry=_telemetry_for(harness, args.gpu_index),
            progress=_pair_progress(say),
        )
    except CandidateAborted:
        raise
    except Exception as exc:
        record.status, record.reason = CRASH, "timing crashed: " + _summary(exc)


def _profile(harness: Harness, record: Evaluation, say) -> Evaluation:
    say("profiling the build")
    try:
        record.profile = harness.profile(record.candidate_build)
    except CandidateAborted:
        raise
    except Exception as exc:  # a profiler that fails or hangs (ncu, perf): the record says so
        record.status, record.reason = CRASH, "the profile failed: " + _summary(exc)
    return record


PAIR_PROGRESS_S = 10.0  # at most one "N pairs" line this often


def _pair_progress(say):
    """The timing's progress callback: the first block, then a line every PAIR_PROGRESS_S."""
    last = [-PAIR_PROGRESS_S]

    def report(n: int, seconds: float) -> None:
        if seconds - last[0] >= PAIR_PROGRESS_S:
            last[0] = seconds
            say(f"timing: {n} pairs in {seconds:.0f} s ({seconds / n:.2f} s a pair)")
    return report


def _finish(record: Evaluation, started: float) -> Evaluation:
    record.seconds = time.monotonic() - started
    return record


def _request(args) -> dict:
    return json.loads(Path(args.request).read_text()) if args.request else {}


def _fingerprint(extra: dict, harness_root: str) -> dict:
    from . import sandbox

    try:
        isolation = sandbox.describe()
    except Exception as exc:
        isolation = f"unknown ({_summary(exc, 200)})"
    try:
        from .system.fingerprint import collect

        return {**collect(extra=extra, software=tuple(load(harness_root).software)), "sandbox": isolation}
    except Exception as exc:  # a record without a full fingerprint is still a record
        return {**extra, "sandbox": isolation, "error": _summary(exc, 300)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--harness", required=True, help="the harness folder (locked side)")
    p.add_argument("--incumbent", help="staged editable files of the incumbent")
    p.add_argument("--candidate", required=True, help="staged editable files of the candidate")
    p.add_argument("--request", help="JSON {nonce: str, check: [...], timing: N}; secret, chosen by the lab")
    p.add_argument("--mode", choices=("evaluate", "check", "aa", "build", "profile"), default="evaluate")
    p.add_argument("--delta", type=float, default=0.005, help="decision threshold (fraction) for the stop rule")
    p.add_argument("--min-pairs", type=int, default=0)
    p.add_argument("--min-seconds", type=float, default=None)
    p.add_argument("--max-seconds", type=float, default=0)
    p.add_argument("--gpu-index", type=int, default=0)
    p.add_argument("--model", help="the workload's model file, for a harness that takes one (Harness.use_model)")
    p.add_argument("--cache", help="build cache folder (default $LAB_CACHE or ~/.cache/lab)")
    p.add_argument("--fingerprint-extra", default="{}", help="JSON merged into the fingerprint")
    args = p.parse_args(argv)
    if args.mode == "evaluate" and not args.incumbent:
        p.error("--incumbent is needed in evaluate mode")
    return args


def private_stdout():
    """A non-inheritable copy of fd 1 for the record; fd 1 itself then points at stderr, so that
    whatever else writes to stdout (a child process, a library) can never reach the channel."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")  # os.dup: not inherited by children
    os.dup2(2, 1)
    return channel


def _send(channel, record: Evaluation, args) -> None:
    request = _safe_request(args)
    record.nonce = record.nonce or str(request.get("nonce", ""))
    record.mode = record.mode or args.mode
    if not record.seeds and request.get("check") and request.get("timing"):
        record.seeds = list(request["check"]) + [request["timing"]]
    record.fingerprint = _fingerprint(json.loads(args.fingerprint_extra), args.harness)
    channel.write(frame(record.to_json(), record.nonce))
    channel.flush()
    sys.stderr.flush()


def _safe_request(args) -> dict:
    try:
        return _request(args)
    except Exception:  # an unreadable request: the lab refuses the record (no nonce)
        return {}


def main(argv=None) -> int:
    place_self()  # the CPU set and the death with the lab, as the lab passed them (natively)
    args = parse_args(argv)
    channel = private_stdout()
    try:
        record = evaluate(args)
    except CandidateAborted as exc:
        record = Evaluation(harness=Path(args.harness).name, status=exc.status, reason=_summary(exc))
        _send(channel, record, args)
        os._exit(0)  # no teardown: the device may be wedged by the candidate
    except Exception as exc:
        # Refusals (a changed locked file, a broken harness, no sandbox) still send a record.
        record = Evaluation(harness=Path(args.harness).name, status=CRASH, reason=_summary(exc))
    _send(channel, record, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
