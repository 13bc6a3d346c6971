"""The runner's record channel (records.frame/unframe) and the lab's check of a record against its
request (evaluate.received_record)."""

import json
import subprocess
import sys

from lab.evaluate import received_record
from lab.records import Build, Check, Evaluation, frame, unframe

from conftest import REPO

NONCE = "n" * 32
REQUEST = {"nonce": NONCE, "check": [1, 2], "timing": 3, "sandbox": "bwrap"}
EXTRA = {"candidate_source": "c" * 64, "incumbent_source": "i" * 64}


class _H:
    name = "cdot"


def _record(**changes) -> Evaluation:
    ev = Evaluation(harness="cdot", nonce=NONCE, mode="evaluate", seeds=[1, 2, 3],
                    candidate_build=Build(ok=True, source_hash="c" * 64),
                    incumbent_build=Build(ok=True, source_hash="i" * 64),
                    check=Check(passed=True), fingerprint={"sandbox": "bubblewrap 0.8.0"})
    for k, v in changes.items():
        setattr(ev, k, v)
    return ev


def test_frames_round_trip_through_other_output_and_long_records():
    text = json.dumps({"x": "y" * 20000})
    out = "noise\n" + frame(text, NONCE) + "more noise\n"
    assert unframe(out, NONCE) == text
    assert unframe(out.replace("\n", "\r\n"), NONCE) == text


def test_frames_refused_when_torn_doubled_or_of_another_nonce():
    text = json.dumps({"a": 1})
    good = frame(text, NONCE)
    assert unframe(good[: len(good) // 2], NONCE) is None
    assert unframe(good + good, NONCE) is None  # a second frame with the nonce: refused
    assert unframe(frame(text, "m" * 32), NONCE) is None
    assert unframe(good.replace('"a": 1', '"a": 2'), NONCE) is None  # sha256 no longer matches
    assert unframe(good, "") is None


def test_a_record_answers_its_request():
    ev = received_record(frame(_record().to_json(), NONCE), REQUEST, _H(), "evaluate", EXTRA)
    assert ev.status == "" and ev.candidate_build.ok


def test_records_that_answer_another_request_are_crashes():
    cases = {
        "another nonce": _record(nonce="x" * 32),
        "harness": _record(harness="wavegru"),
        "mode": _record(mode="aa"),
        "other seeds": _record(seeds=[9, 9, 9]),
        "the candidate built from another source": _record(candidate_build=Build(ok=True, source_hash="d" * 64)),
        "the incumbent built from another source": _record(incumbent_build=Build(ok=True, source_hash="d" * 64)),
        "without the sandbox": _record(fingerprint={"sandbox": "none (--no-sandbox)"}),
    }
    for why, record in cases.items():
        ev = received_record(frame(record.to_json(), NONCE), REQUEST, _H(), "evaluate", EXTRA)
        assert ev.status == "CRASH" and why in ev.reason, (why, ev.reason)


def test_the_runner_keeps_stdout_for_the_record(tmp_path):
    """Children of the runner write to fd 1 and land on stderr; the record alone is on stdout."""
    code = ("import os, subprocess, sys\n"
            "from lab.runner import private_stdout\n"
            "from lab.records import frame\n"
            "channel = private_stdout()\n"
            "print('from python')\n"
            "subprocess.run(['sh', '-c', 'echo from a child; ls -l /proc/self/fd/ >&2'])\n"
            "channel.write(frame('{}', 'n' * 32)); channel.flush()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert unframe(out.stdout, NONCE) == "{}"
    assert "from python" not in out.stdout and "from a child" not in out.stdout
    assert "from python" in out.stderr and "from a child" in out.stderr
