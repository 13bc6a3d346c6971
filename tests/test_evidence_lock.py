"""Locks define the workload, not its history (issue 17.2): a shipped harness's lock covers its
contract only (code, reference, oracle, headers, program.md, solutions, data), never measured
evidence or device scripts, which live in docs/evidence/<harness>/ and scripts/<harness>/. So a
commit that only adds evidence leaves every lock digest, bundle and resumable run as it was
(test_bundle_hostile.py shows a bundle reproduced and a run resumed after such a commit)."""

import re

import pytest

from lab.harness import UNLOCKED, load, verify_lock

from conftest import REPO

SHIPPED = ("wavegru", "llamacpp", "mlx")
EVIDENCE = re.compile(r"(^|/)(BENCH[^/]*\.md|results[^/]*(/|$)|bench_[^/]*\.json|[^/]*_check\.sh|"
                      r"scaling[^/]*|measured[^/]*\.json)")


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_lock_holds_the_contract_and_no_evidence(name):
    harness = load(REPO / "harnesses" / name)
    verify_lock(harness)  # lock.json is current
    locked = harness.locked_files()
    evidence = [p for p in locked if EVIDENCE.search(p)]
    assert not evidence, f"evidence inside the lock of {name}: {evidence}; move it to docs/evidence/{name}/"
    assert UNLOCKED == {"lock.json", "image.lock.json"}, "the lock ignores nothing else"


def test_evidence_has_its_own_home_outside_the_harnesses():
    for name in SHIPPED:
        assert (REPO / "docs" / "evidence" / name).is_dir()
        assert not list((REPO / "harnesses" / name).glob("BENCH*.md"))
