"""WaveGRU's seal and guards without a GPU (issue 15): the build sees only its two files at a
fixed path, refuses includes from outside in one line that quotes nothing, ends a runaway
compile with its whole tree; guard regions name the buffer a kernel wrote past; every timed
sample is settled against its partner and, where they differ, by the reference."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lab.harness import load

HARNESS = Path(__file__).resolve().parent.parent / "harnesses" / "wavegru"


@pytest.fixture(scope="module")
def wg():
    import importlib

    h = load(HARNESS)
    pkg = type(h).__module__.rsplit(".", 1)[0]
    mods = {m: importlib.import_module(f"{pkg}.{m}") for m in ("build", "oracle", "device")}
    mods["harness"] = h
    return mods


# --- includes --------------------------------------------------------------------------------
def test_parse_deps_reads_make_rules(wg):
    text = "kernel.o : kernel.cu \\\n    /usr/include/stdio.h /stage/wavegru.h \\\n    /a\\ b/c.h\n"
    assert wg["build"].parse_deps(text) == ["kernel.cu", "/usr/include/stdio.h", "/stage/wavegru.h", "/a b/c.h"]


def test_include_rule(wg, tmp_path):
    b = wg["build"]
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True)
    ok = ["/stage/kernel.cu", "wavegru.h", str(toolkit / "include" / "cuda_runtime.h"), "/usr/include/stdio.h"]
    assert b.include_problem(ok, "/stage", toolkit) is None
    for bad, shown in (("/etc/passwd", "/etc/passwd"), ("/usr/include/../../etc/shadow", "/etc/shadow"),
                       ("/stage/../outside/lab/harness.py", "/outside/lab/harness.py"), ("/stage/seeds.json", "seeds.json"),
                       (str(toolkit / "bin" / "nvcc.profile"), "nvcc.profile")):
        reason = b.include_problem(ok + [bad], "/stage", toolkit)
        assert reason and shown in reason and "\n" not in reason, (bad, reason)


def test_failed_preprocessing_shows_only_the_kernels_lines(wg):
    out = ("In file included from /stage/kernel.cu:3:\n/etc/secret.conf:1:2: error: invalid directive #password=hunter2\n"
           "    1 | #password=hunter2\n/stage/kernel.cu:9:10: fatal error: nope.h: No such file or directory\n")
    shown = wg["build"].own_lines(out, "/stage")
    assert shown == "kernel.cu:9:10: fatal error: nope.h: No such file or directory"
    assert "hunter2" not in shown


# --- the sandboxed compiler, driven through a fake nvcc ----------------------------------------
FAKE_NVCC = r"""#!/bin/sh
# a stand-in for nvcc: -M prints a dependency rule; a compile lists what it can see
for a in "$@"; do last="$a"; prev_o="$o"; o="$a"; done
case " $* " in
  *" -M "*) [ -n "$FAKE_HANG" ] && { sleep 1000 & sleep 1000; }
            echo "kernel.o : $last $(dirname "$last")/wavegru.h"; exit 0 ;;
esac
dir=$(dirname "$last")
ls -A "$dir"; pwd; env | grep -c SECRET_FOR_TEST
touch "$dir/kernel.cubin"
"""


@pytest.fixture
def fake_nvcc(tmp_path):
    tk = tmp_path / "toolkit"
    (tk / "bin").mkdir(parents=True)
    nvcc = tk / "bin" / "nvcc"
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    for p in (tmp_path, tk, tk / "bin"):
        p.chmod(0o755)
    return str(nvcc)


def test_build_sees_only_its_two_files(wg, fake_nvcc, monkeypatch):
    monkeypatch.setenv("SECRET_FOR_TEST", "x")
    res = wg["build"].sealed_nvcc(fake_nvcc, [], [], b"// kernel\n", b"// header\n", limit_s=60)
    assert res.ok, res.error
    listing = res.report.split()
    assert sorted(listing[:2]) == ["kernel.cu", "wavegru.h"], res.report  # nothing else in the stage
    assert listing[-1] == "0"  # the environment is scrubbed
    from lab import sandbox

    if sandbox.mode() == "bwrap":
        assert listing[2] == "/stage", res.report


def test_build_past_the_limit_ends_its_tree(wg, fake_nvcc, monkeypatch):
    monkeypatch.setenv("FAKE_HANG", "1")
    from lab import sandbox

    box_env = dict(sandbox.Sandbox.__dataclass_fields__["env"].default_factory())
    assert box_env == {}
    # FAKE_HANG must reach the fake nvcc through the scrubbed environment: pass it explicitly.
    real = sandbox.Sandbox.__init__

    def with_hang(self, *a, **k):
        real(self, *a, **k)
        self.env = {**self.env, "FAKE_HANG": "1"}

    monkeypatch.setattr(sandbox.Sandbox, "__init__", with_hang)
    t0 = time.monotonic()
    res = wg["build"].sealed_nvcc(fake_nvcc, [], [], b"", b"", limit_s=3)
    took = time.monotonic() - t0
    assert not res.ok and res.timed_out and "build limit" in res.error and "\n" not in res.error
    assert took < 3 + 10, took
    time.sleep(0.5)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"sleep\x001000" in Path(f"/proc/{pid}/cmdline").read_bytes():
                left.append(pid)
        except OSError:
            pass
    assert not left, f"the fake compiler's children outlived the limit: {left}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_real_nvcc_refuses_outside_includes(wg, tmp_path):
    h = wg["harness"]
    cases = {"abs": '#include "/etc/passwd"\n', "arch": '#ifdef __CUDA_ARCH__\n#include "/etc/passwd"\n#endif\n',
             "up": '#include "../../lab/harness.py"\n'}
    for name, line in cases.items():
        src = tmp_path / name
        src.mkdir()
        (src / "kernel.cu").write_text(line + (HARNESS / "kernel.cu").read_text())
        b = h.build(src, tmp_path / f"out-{name}")
        assert not b.ok, name
        assert "root:" not in b.error + b.report, name
        if name != "up":
            assert b.error.count("\n") == 0 and "/etc/passwd" in b.error, b.error
        else:
            assert "No such file" in b.error and "harness.py" in b.error, b.error


# --- guard regions ----------------------------------------------------------------------------
def test_guards_name_the_buffer_written_past(wg):
    torch = pytest.importorskip("torch")
    dev = wg["device"]
    a = dev.Arena(torch, [("tokens", 100, torch.int32), ("p", 100, torch.int32)], device="cpu")
    a["tokens"].fill_(7)
    a["p"].fill_(8)
    assert a.guard_problems() == []
    off, nbytes, _, _ = a.spans["tokens"]
    a.mem[off + nbytes + 1] ^= 1  # one byte past the end of tokens
    a.mem[a.spans["p"][0] - 1] ^= 1  # ... which is also the guard just before p
    first = a.mem[: a.spans["tokens"][0]]
    first[-1] ^= 1  # before the start of tokens
    problems = a.guard_problems()
    assert any("before the start of tokens" in p for p in problems), problems
    assert any("past the end of tokens" in p and "before the start of p" in p for p in problems), problems
    assert all("past the end of p" not in p for p in problems)
    a.scrub()
    assert not (a["tokens"] == 7).any()


def test_buffers_sit_at_fresh_offsets(wg):
    torch = pytest.importorskip("torch")
    dev = wg["device"]
    offsets = {dev.Arena(torch, [("x", 10, torch.float32)], device="cpu").spans["x"][0] for _ in range(40)}
    assert len(offsets) > 10 and all(o % 256 == 0 for o in offsets)


def test_both_sides_of_a_pair_share_a_placement_that_changes_per_pair(wg):
    """A timed sample's buffers start at an offset drawn from the pair's seed: the two sides of
    a pair (same seed) sit at one offset, so what an address costs cancels in their ratio, and
    the offset still moves from pair to pair (nothing can key a cache on it)."""
    torch = pytest.importorskip("torch")
    dev, oracle = wg["device"], wg["oracle"]

    def start(seed):
        arena = dev.Arena(torch, [("x", 10, torch.float32)], device="cpu",
                          placement=oracle.derive(seed, "placement"))
        return arena.spans["x"][0]

    assert start(12345) == start(12345)
    assert len({start(seed) for seed in range(40)}) > 10


# --- every timed sample settled ------------------------------------------------------------------
def _out(T=64, seed=0):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(tokens=rng.integers(0, 256, (T, 1)).astype(np.int32),
                           p=rng.uniform(0.1, 0.9, (T, 1)).astype(np.float32),
                           h0=rng.normal(size=(1, 1024)).astype(np.float32),
                           h1=rng.normal(size=(1, 1024)).astype(np.float32))


def _sample():
    from lab.records import Sample

    return Sample(seconds=0.1, value=1.0)


def test_outputs_agree_rule(wg):
    o = wg["oracle"]
    a = _out()
    b = SimpleNamespace(**{k: v.copy() for k, v in vars(a).items()})
    assert o.outputs_agree(a, b) == ""
    b.p[3, 0] += 5e-7  # another summation order
    b.h1[0, 5] += 5e-7
    assert o.outputs_agree(a, b) == ""
    b.p[7, 0] *= 1.05  # a logit at the min-p cut kept by one side only
    assert o.outputs_agree(a, b) == ""
    c = SimpleNamespace(**{k: v.copy() for k, v in vars(a).items()})
    c.tokens[40, 0] = (c.tokens[40, 0] + 1) % 256
    assert "step 40" in o.outputs_agree(a, c)
    d = SimpleNamespace(**{k: v.copy() for k, v in vars(a).items()})
    d.p[:, 0] = np.minimum(d.p[:, 0] * 1.5, 1)  # unnormalised p
    assert "p differs" in o.outputs_agree(a, d)
    e = SimpleNamespace(**{k: v.copy() for k, v in vars(a).items()})
    e.h0 = e.h0.view(np.uint32) & np.uint32(0xFFFF0000)
    e.h0 = e.h0.view(np.float32)  # bf16-truncated states
    assert "h0" in o.outputs_agree(a, e)


def test_pairs_settle_and_the_reference_decides(wg):
    o = wg["oracle"]
    calls = []

    def adjudicate(noise, outs):
        calls.append(len(outs))
        return ["" if i == 0 else "token 3 at step 9 is not a valid sample" for i in range(len(outs))]

    pairs = o.TimedPairs(adjudicate)
    a, b = _out(seed=1), _out(seed=1)
    sa, sb = _sample(), _sample()
    pairs.add(1, 11, a, sa, None)
    pairs.add(2, 11, b, sb, None)
    assert sa.ok and sb.ok and calls == []  # equal: no reference needed
    c = _out(seed=1)
    c.tokens[9, 0] = (c.tokens[9, 0] + 1) % 256
    sa, sc = _sample(), _sample()
    pairs.add(1, 12, a, sa, None)
    pairs.add(2, 12, c, sc, None)
    assert calls == [2] and sa.ok and not sc.ok and "reference rejects" in sc.detail
    # the first of a pair is settled by the second, whichever side is wrong
    sc2, sa2 = _sample(), _sample()
    pairs.add(2, 13, c, sc2, None)
    pairs.add(1, 13, a, sa2, None)
    assert sc2.ok is True and sa2.ok is False  # adjudicate above fails whoever came second


def test_a_sample_without_partner_fails(wg):
    o = wg["oracle"]
    pairs = o.TimedPairs(lambda noise, outs: [""] * len(outs))
    s1, s2 = _sample(), _sample()
    pairs.add(1, 21, _out(), s1, None)
    pairs.add(1, 22, _out(), s2, None)  # the same side moves on: 21 never got its partner
    assert not s1.ok and "never compared" in s1.detail
    pairs.abandon(1)  # unload
    assert not s2.ok


def test_verify_against_reference(wg):
    o = wg["oracle"]
    T = 32
    out = _out(T)
    good = SimpleNamespace(tokens=out.tokens.copy(), p=out.p.astype(np.float64), h0=out.h0.astype(np.float64),
                           h1=out.h1.astype(np.float64), deficit=np.zeros((T, 1)), forced_gap=np.ones((T, 1)),
                           threshold_gap=np.ones((T, 1)))
    assert o.verify_against_reference(out, good) == ""
    bad = SimpleNamespace(**vars(good))
    bad.deficit = good.deficit.copy()
    bad.deficit[5, 0] = 0.3
    assert "step 5" in o.verify_against_reference(out, bad)
    worse = SimpleNamespace(**vars(good))
    worse.h1 = good.h1 + 1e-3
    assert "h1" in o.verify_against_reference(out, worse)


def test_secret_shape_is_another_shape(wg):
    o = wg["oracle"]
    shapes = {o.secret_shape(s) for s in range(50)}
    assert all(1024 <= T <= 6144 and 2 <= B <= 4 and T != o.T_TIMED for T, B in shapes)
    assert len(shapes) > 40
