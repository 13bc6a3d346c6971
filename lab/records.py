"""Typed records that serialise to JSON: one schema, written in one place.

Every record the lab writes (a build, a check, a timed sample, a verdict, a whole evaluation)
is one of these dataclasses. `to_dict` / `from_dict` are the only serialisers; `SCHEMA_VERSION`
is stamped on every evaluation record and run folder so that an older lab refuses newer data.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field

# 2: an `evaluated` event's status is its Status (KEEP, SAME, ...), no longer keep/discard/fail/crash;
# a run folder of schema 1 is still read (lab.store.outcome maps the old spellings).
SCHEMA_VERSION = 2

try:
    from enum import StrEnum
except ImportError:  # Python 3.10
    class StrEnum(str, enum.Enum):  # type: ignore[no-redef]
        def __str__(self) -> str:
            return str(self.value)


class Status(StrEnum):
    """The outcome of one evaluation: the one vocabulary of verdicts, `evaluated` events,
    results.tsv and every harness's solutions/expected.json. A member is its own name as a str,
    so it compares equal to, and serialises as, "KEEP", "FAIL", ..."""

    KEEP = "KEEP"  # the whole CI faster by at least delta (a keep after its confirmation run)
    SAME = "SAME"  # not decided faster or slower by delta
    WORSE = "WORSE"  # the whole CI slower by at least delta
    FAIL = "FAIL"  # the build, the oracle, a timed sample's own check or a guard failed
    CRASH = "CRASH"  # the runner or the device broke (or the incumbent no longer builds)
    TIMEOUT = "TIMEOUT"  # the evaluation ran past its time limit and was killed
    REJECTED = "REJECTED"  # the guard refused the patch before anything was built
    PASS = "PASS"  # a check-only evaluation whose oracle passed (no timing, so no speed verdict)


KEEP, SAME, WORSE = Status.KEEP, Status.SAME, Status.WORSE
FAIL, CRASH, TIMEOUT, REJECTED, PASS = Status.FAIL, Status.CRASH, Status.TIMEOUT, Status.REJECTED, Status.PASS
VERDICTS = tuple(Status)


# --- speedups (also lab.stats.speedup, lab.stats.speedup_ci) ---------------------------------
def speedup(log_ratio: float | None) -> float | None:
    """Incumbent time over candidate time for x = log(t_candidate / t_incumbent): 2.0 is twice as
    fast; None for None."""
    return None if log_ratio is None else math.exp(-log_ratio)


def speedup_ci(ci_low: float | None, ci_high: float | None) -> tuple[float, float] | None:
    """A CI of x as a CI of the speedup, (low, high): the bounds swap (a lower x is a higher
    speedup); None when the CI is unknown."""
    if ci_low is None or ci_high is None:
        return None
    return math.exp(-ci_high), math.exp(-ci_low)


class Record:
    """Mixin: JSON round trip for dataclasses, recursing into nested records and lists of them."""

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(typing.cast(typing.Any, self)))

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(typing.cast(typing.Any, cls)):
            if f.name in data:
                kwargs[f.name] = _load(hints[f.name], data[f.name])
        return cls(**kwargs)


def json_safe(value):
    """`value` with every NaN and infinity replaced by None: they are not JSON, and every record
    and event must parse in any reader (the one NaN cleaner of the lab)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _load(hint, value):
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _load(inner[0], value) if len(inner) == 1 else value
    if origin is list and args:
        return [_load(args[0], v) for v in value]
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value)
    return value


@dataclass
class Metric(Record):
    """What a harness reports: e.g. Metric("throughput_sps", "samples/s", higher_is_better=True)."""

    name: str
    unit: str
    higher_is_better: bool = True


@dataclass
class Environment(Record):
    """Where a harness is evaluated: a pinned image, a Nix dev shell, or natively."""

    image: str = ""  # reference pinned by digest, e.g. 127.0.0.1:5000/lab/wavegru@sha256:...
    dockerfile: str = ""  # relative to the lab's repository root
    nix_shell: str = ""  # a flake output, e.g. .#cuda
    needs_gpu: bool = False


@dataclass
class Build(Record):
    ok: bool
    source_hash: str  # sha256 over the editable files that went in
    artifact: str = ""  # path of the built artifact
    artifact_sha256: str = ""
    report: str = ""  # compiler report (registers, spills, warnings)
    error: str = ""  # compiler errors when ok is False
    seconds: float = 0.0
    cached: bool = False
    info: dict = field(default_factory=dict)  # harness-specific numbers (registers, smem, ...)


@dataclass
class CheckItem(Record):
    name: str
    passed: bool
    values: dict = field(default_factory=dict)
    detail: str = ""


@dataclass
class Check(Record):
    passed: bool
    items: list[CheckItem] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # human-readable, in the harness's own line format
    output_hashes: dict = field(default_factory=dict)  # name -> sha256 of outputs, for bit-identity
    seconds: float = 0.0

    def failures(self) -> list[str]:
        return [f"{i.name}: {i.detail}" if i.detail else i.name for i in self.items if not i.passed]


@dataclass
class Sample(Record):
    """One timed unit of the metric: a fixed amount of work, verified by the harness itself."""

    seconds: float  # time of the unit on the harness's own clock (device events for GPUs)
    value: float  # the metric for this unit (e.g. samples/s)
    ok: bool = True  # the unit's own outputs passed the harness's check
    wall_seconds: float = 0.0  # host clock around the same unit, to cross-check `seconds`
    work: dict = field(default_factory=dict)  # counters of work done (steps, tokens, streams)
    detail: str = ""


@dataclass
class Pair(Record):
    """One interleaved pair: the incumbent and the candidate, timed back to back."""

    index: int
    order: str  # "AB" when the incumbent ran first, "BA" otherwise
    incumbent: Sample
    candidate: Sample
    block: int = 0  # telemetry block this pair belongs to
    loaded_first: str = "A"  # which side was allocated first for this pair's block (rotate_placement)

    def log_ratio(self) -> float:
        return math.log(self.candidate.seconds / self.incumbent.seconds)


@dataclass
class TelemetryBlock(Record):
    index: int
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None
    reasons: list[str] = field(default_factory=list)
    throttled: bool = False  # thermal or hardware slowdown seen: the block's pairs are dropped


@dataclass
class Verdict(Record):
    status: str  # a Status
    reason: str = ""
    median: float | None = None  # median per-pair log(t_candidate / t_incumbent)
    ci_low: float | None = None
    ci_high: float | None = None
    delta: float | None = None  # the decision threshold as a fraction (0.005 = 0.5 %)
    pairs: int = 0
    dropped_pairs: int = 0
    needs_confirmation: bool = False

    @property
    def speedup(self) -> float | None:
        """Incumbent time over candidate time (2.0 = twice as fast)."""
        return speedup(self.median)

    @property
    def speedup_ci(self) -> tuple[float, float] | None:
        """The CI of the speedup, (low, high)."""
        return speedup_ci(self.ci_low, self.ci_high)


@dataclass
class Evaluation(Record):
    """What one runner process writes: builds, the candidate's check, the paired samples."""

    harness: str
    incumbent_build: Build | None = None
    candidate_build: Build | None = None
    check: Check | None = None
    pairs: list[Pair] = field(default_factory=list)
    telemetry: list[TelemetryBlock] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    status: str = ""  # "" when the timing ran; FAIL/CRASH with `reason` otherwise
    reason: str = ""
    seconds: float = 0.0
    timing_seconds: float = 0.0
    work: dict = field(default_factory=dict)
    timing_cpus: list[int] = field(default_factory=list)  # the cores the timing was pinned to
    busy_cpus: list[int] = field(default_factory=list)  # of those, busy just before the timing
    nonce: str = ""  # the lab's request, echoed: a record answers exactly one request
    mode: str = ""  # evaluate, check, aa, build or profile, as requested
    profile: str = ""  # mode profile: the harness's profile digest of the candidate (never a verdict)
    schema_version: int = SCHEMA_VERSION


# --- the runner's record channel --------------------------------------------------------------
# The runner sends its record on a private copy of its stdout (lab/runner.py), framed: a begin
# line with the request's nonce, the record's sha256 and length, the compact JSON in lines of at
# most FRAME_LINE characters (log drivers split longer lines), and an end line.
FRAME_BEGIN, FRAME_END, FRAME_LINE = "<<<lab-record", "<<<lab-record-end", 4000


def frame(text: str, nonce: str) -> str:
    digest = hashlib.sha256(text.encode()).hexdigest()
    chunks = [text[i:i + FRAME_LINE] for i in range(0, len(text), FRAME_LINE)] or [""]
    return "\n".join([f"{FRAME_BEGIN} {nonce} {digest} {len(text)}", *chunks, f"{FRAME_END} {nonce}", ""])


def unframe(output: str, nonce: str) -> str | None:
    """The one record framed with `nonce` in `output`, intact (length and sha256 match), else
    None. Frames with another nonce, torn frames and any other output are ignored; two frames
    with the nonce are refused."""
    if not nonce:
        return None
    lines = [line.rstrip("\r") for line in output.split("\n")]
    found = []
    for i, line in enumerate(lines):
        head = line.split(" ")
        if len(head) != 4 or head[0] != FRAME_BEGIN or head[1] != nonce:
            continue
        try:
            end = lines.index(f"{FRAME_END} {nonce}", i + 1)
        except ValueError:
            continue
        text = "".join(lines[i + 1:end])
        if head[3] == str(len(text)) and hashlib.sha256(text.encode()).hexdigest() == head[2]:
            found.append(text)
    return found[0] if len(found) == 1 else None
