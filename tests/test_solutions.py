"""Every harness's solutions/expected.json follows the one schema (tests/solutions.py): a Status
per shipped patch, nothing else. The verdicts themselves are asserted by each harness's own tests
(test_wavegru_gpu, test_llamacpp_solutions, test_mlx_solutions, test_evaluate for cdot)."""

import pytest

from conftest import REPO
from solutions import Expected, SchemaError, expected, parse, shipped

from lab.records import Status

HARNESSES = sorted(p.parent for base in (REPO / "harnesses", REPO / "examples")
                   for p in base.glob("*/solutions"))


def test_every_shipped_harness_has_solutions():
    assert {h.name for h in HARNESSES} >= {"wavegru", "llamacpp", "mlx", "cdot"}


@pytest.mark.parametrize("harness", HARNESSES, ids=lambda p: p.name)
def test_expected_json_follows_the_schema_and_names_every_patch(harness):
    cases = expected(harness)
    assert set(cases) == shipped(harness)
    statuses = {c.status for c in cases.values()}
    assert statuses & {Status.KEEP, Status.PASS, Status.SAME}, "ships no known-good candidate"
    assert statuses & {Status.FAIL, Status.CRASH, Status.TIMEOUT, Status.REJECTED}, "ships no known-bad one"


@pytest.mark.parametrize("data, why", [
    ({"correct/a.patch": "pass"}, "not a Status"),  # the old spelling of PASS/KEEP
    ({"wrong/b.patch": "BUILD_LIMIT"}, "not a Status"),
    ({"wrong/b.patch": {"status": "FAIL", "why": "x"}}, "holds 'status'"),
    ({"wrong/b.patch": {"status": "FAIL", "reason": ""}}, "'reason' is the text"),
    ({"b.diff": "FAIL"}, ".patch file"),
    ({}, "non-empty"),
])
def test_the_schema_refuses(data, why):
    with pytest.raises(SchemaError, match=why):
        parse(data)


def test_the_schema_reads_both_forms_and_checks_the_listing():
    data = {"a.patch": "KEEP", "b.patch": {"status": "FAIL", "reason": "build limit"}}
    assert parse(data, {"a.patch", "b.patch"}) == {"a.patch": Expected(Status.KEEP),
                                                   "b.patch": Expected(Status.FAIL, "build limit")}
    with pytest.raises(SchemaError, match="not listed"):
        parse(data, {"a.patch", "b.patch", "c.patch"})
