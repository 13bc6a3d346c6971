"""llama.cpp harness without building llama.cpp: the llama-bench JSONL parser (tolerant fields,
insane rows, missing rows), a sample from a fake llama-bench, the model check (a file that is
not a GGUF is refused), the GGUF reader the oracle uses, the fixed workload, the editable
surface and its guard, and the build overlay. The builds and the real oracle are in
test_llamacpp_solutions.py (slow)."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lab import sandbox
from lab.errors import EnvironmentUnavailable, PatchRejected
from lab.harness import load
from lab.workspace import guard_patch

from conftest import git
from solutions import expected

HARNESS = Path(__file__).resolve().parent.parent / "harnesses" / "llamacpp"
SOLUTIONS = HARNESS / "solutions"


@pytest.fixture(scope="module")
def lc():
    import importlib

    h = load(HARNESS)
    pkg = type(h).__module__.rsplit(".", 1)[0]
    mods = {m: importlib.import_module(f"{pkg}.{m}")
            for m in ("bench", "build", "driver", "gguf", "model", "oracle", "source")}
    mods["harness"] = h
    return mods


def _row(**over) -> dict:
    """A generation row as llama-bench 0c1e57098 prints it (the fields the harness reads)."""
    row = {"build_commit": "0c1e57098", "model_size": 246587904, "n_threads": 2, "n_prompt": 0, "n_gen": 128,
           "avg_ns": 1600000000, "avg_ts": 80.0, "samples_ns": [1600000000], "samples_ts": [80.0]}
    row.update(over)
    return {k: v for k, v in row.items() if v is not None}


EXPECTED = {"n_gen": 128, "n_prompt": 0, "n_threads": 2, "build_commit": "0c1e57098"}


def _tg(lc, text, wall=2.5, floor=0.0):
    return lc["bench"].tg_result(text, wall_seconds=wall, min_seconds=floor, expected=EXPECTED)


# --- the JSONL parser -------------------------------------------------------------------------
def test_parser_reads_the_generation_row_among_logs_and_other_rows(lc):
    text = "\n".join([
        "load_backend: loaded CPU backend",
        json.dumps(_row(n_prompt=512, n_gen=0, avg_ts=900.0, samples_ns=[568888888])),  # a pp512 row
        "llama-bench: benchmark 1/2: generation run 1/1",
        json.dumps(_row()),
        '{"truncated": ',
    ])
    got = _tg(lc, text)
    assert not isinstance(got, str), got
    assert got.seconds == pytest.approx(1.6) and got.tokens_per_s == pytest.approx(80.0)


def test_parser_tolerates_numbers_as_strings_and_missing_optional_fields(lc):
    row = _row(n_gen="128", n_prompt="0", n_threads="2", avg_ts="80.0", samples_ts=None, model_size=None)
    row["samples_ns"] = "1600000000"
    got = _tg(lc, json.dumps(row))
    assert not isinstance(got, str), got
    assert got.seconds == pytest.approx(1.6)


def test_parser_falls_back_to_avg_ns_then_avg_ts(lc):
    assert _tg(lc, json.dumps(_row(samples_ns=None))).seconds == pytest.approx(1.6)
    assert _tg(lc, json.dumps(_row(samples_ns=None, avg_ns=None))).seconds == pytest.approx(1.6)
    assert "no time" in _tg(lc, json.dumps(_row(samples_ns=None, avg_ns=None, avg_ts=None)))


@pytest.mark.parametrize("text,reason", [
    ("", "no generation row"),
    ("error: failed to load model\n", "no generation row"),
    (json.dumps(_row(n_prompt=512, n_gen=0)), "no generation row"),
    (json.dumps(_row()) + "\n" + json.dumps(_row()), "2 generation rows"),
])
def test_missing_or_extra_rows_are_refused(lc, text, reason):
    assert reason in _tg(lc, text)


@pytest.mark.parametrize("over,reason", [
    ({"samples_ns": [0], "avg_ts": None}, "not a finite positive"),
    ({"samples_ns": [-5], "avg_ts": None}, "not a finite positive"),
    ({"samples_ns": [1600000000, 1600000000]}, "2 repetitions"),
    ({"avg_ts": 160.0}, "disagrees"),
    ({"avg_ts": float("nan")}, "disagrees"),
    ({"n_gen": 64, "avg_ts": 40.0}, "n_gen=64"),
    ({"n_threads": 1}, "n_threads=1"),
    ({"build_commit": "deadbeef"}, "build_commit='deadbeef'"),
])
def test_insane_rows_are_refused(lc, over, reason):
    got = _tg(lc, json.dumps(_row(**over)))
    assert isinstance(got, str) and reason in got, got


def test_a_time_outside_the_process_or_under_the_floor_is_refused(lc):
    assert "inside a process that ran" in _tg(lc, json.dumps(_row()), wall=1.0)
    assert "faster than the memory bandwidth" in _tg(lc, json.dumps(_row()), floor=2.0)


def test_the_command_fixes_the_workload(lc):
    b = lc["bench"]
    cpu = b.command(Path("bin/llama-bench"), Path("m.gguf"), backend="cpu", threads=2, cpu_mask=b.cpu_mask([0, 1]))
    text = " ".join(cpu)
    for flags in ("-p 0", "-n 128", "-r 1", "-o jsonl", "-fa 1", "-t 2", "-C 0x3", "--cpu-strict 1", "-ngl 0"):
        assert flags in text
    gpu = " ".join(b.command(Path("llama-bench"), Path("m.gguf"), backend="cuda", threads=8, cpu_mask="0xff"))
    assert "-ngl 99" in gpu and "-fa 1" in gpu and "-n 128" in gpu
    assert b.cpu_mask([2, 5]) == "0x24"


def test_workload_counters(lc):
    h = lc["harness"]
    assert h.workload() == {"n_gen": 64, "prompt_words": [12, 24]}


# --- a sample from a fake llama-bench ----------------------------------------------------------
def _fake_bench(tmp_path, body: str) -> tuple:
    script = tmp_path / "llama-bench"
    script.write_text(f"#!{sys.executable}\nimport json, sys, time\n{body}\n")
    script.chmod(0o755)
    tmp_path.chmod(0o755)  # pytest's are root's alone; the sandbox runs as nobody
    box = sandbox.Sandbox(binds=[sandbox.Bind(tmp_path)], python=True)
    return box, [str(script)]


def test_sample_from_a_sane_run(lc, tmp_path):
    box, cmd = _fake_bench(tmp_path, f"time.sleep(0.05); print(json.dumps({_row(samples_ns=[20000000], avg_ts=6400.0)!r}))")
    s = lc["bench"].run(box, cmd, threads=2, min_seconds=0.001, build_commit="0c1e57098")
    assert s.ok, s.detail
    assert s.seconds == pytest.approx(0.02) and s.value == pytest.approx(6400.0)
    assert s.wall_seconds >= s.seconds
    assert s.work == {"n_gen": 128, "n_prompt": 0, "threads": 2}


@pytest.mark.parametrize("body,reason", [
    ("print('nothing to see')", "no generation row"),
    ("sys.stderr.write('GGML_ASSERT failed\\n'); sys.exit(134)", "exited 134"),
    (f"print(json.dumps({_row(samples_ns=[9000000000], avg_ts=128/9)!r}))", "inside a process"),
])
def test_a_broken_run_is_a_failed_sample_with_the_reason(lc, tmp_path, body, reason):
    box, cmd = _fake_bench(tmp_path, body)
    s = lc["bench"].run(box, cmd, threads=2, min_seconds=0.0, build_commit="0c1e57098")
    assert not s.ok and reason in s.detail, s.detail
    assert math.isnan(s.seconds)


# --- GGUF and the model --------------------------------------------------------------------------
def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    """A small valid GGUF v3 file (string metadata; i32 and f32 tensors)."""
    types = {np.dtype(np.float32): 0, np.dtype(np.int32): 26}
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, v in metadata.items():
        head += _gguf_string(k) + struct.pack("<I", 8) + _gguf_string(v)
    offset, blobs = 0, []
    for name, arr in tensors.items():
        shape = tuple(reversed(arr.shape))
        head += _gguf_string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        head += struct.pack("<IQ", types[arr.dtype], offset)
        data = arr.tobytes()
        data += b"\0" * (-len(data) % 32)
        blobs.append(data)
        offset += len(data)
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + b"".join(blobs))
    return path


def test_gguf_reader_reads_what_llama_results_writes(lc, tmp_path):
    tokens = np.array([2, 651, 6037], dtype=np.int32)
    logits = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    g = lc["gguf"].read(write_gguf(tmp_path / "r.gguf", {"tokens": tokens, "logits": logits}, {"path_model": "m"}))
    assert np.array_equal(g.array("tokens"), tokens)
    assert np.array_equal(g.array("logits"), logits)
    assert g.metadata["path_model"] == "m"


def test_a_file_that_is_not_a_gguf_is_refused(lc, tmp_path):
    m, h = lc["model"], lc["harness"]
    bad = tmp_path / "model.gguf"
    bad.write_text("this is a text file, not a model\n")
    with pytest.raises(m.ModelError, match="not a GGUF file"):
        h.use_model(bad)
    with pytest.raises(m.ModelError, match="does not exist"):
        h.use_model(tmp_path / "missing.gguf")
    assert h.model_path is None  # a refused file leaves the harness on its own model


def test_a_truncated_or_tensorless_gguf_is_refused(lc, tmp_path):
    m, h = lc["model"], lc["harness"]
    full = write_gguf(tmp_path / "full.gguf", {"w": np.ones((4, 8), np.float32)}, {"general.architecture": "llama"})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:40])
    with pytest.raises(m.ModelError, match="truncated"):
        h.use_model(cut)
    empty = write_gguf(tmp_path / "empty.gguf", {}, {"general.architecture": "llama"})
    with pytest.raises(m.ModelError, match="without tensors"):
        h.use_model(empty)


def test_any_gguf_by_path_is_accepted_and_its_sha256_recorded(tmp_path):
    h = load(HARNESS)  # its own instance: the model chosen here must not leak into other tests
    path = write_gguf(tmp_path / "tiny.gguf", {"w": np.ones((4, 8), np.float32)},
                      {"general.architecture": "llama", "general.name": "tiny"})
    identity = h.use_model(path)
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert identity == {"name": "tiny.gguf", "sha256": sha, "bytes": path.stat().st_size, "architecture": "llama"}
    got = h.model()
    assert got.path == path.resolve() and got.name == "tiny" and got.sha256 == sha
    assert h.model_identity() == identity


# --- the oracle's pure parts ------------------------------------------------------------------------
def test_nmse_matches_llama_results_definition(lc):
    o = lc["oracle"]
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert o.nmse(a, a) == 0.0
    assert o.nmse(a, a * 1.001) == pytest.approx(1e-6)
    assert o.nmse(a, np.full_like(a, np.nan)) == math.inf


def test_secret_excerpts_vary_with_the_seed_and_are_reproducible(lc):
    o = lc["oracle"]
    a, b = o.excerpt(1, "completion", (12, 24)), o.excerpt(2, "completion", (12, 24))
    assert a != b and a == o.excerpt(1, "completion", (12, 24))
    assert 12 <= len(a.split()) <= 24 and len(o.excerpt(3, "logits", 40).split()) == 40


def test_the_tools_run_sandboxed_with_a_scrubbed_environment(lc, monkeypatch, tmp_path):
    """The oracle's tools see the binaries, the model and the corpus, and nothing of the lab:
    no LLAMA_ARG_* / GGML_* overrides, not the cache, not the runner's process."""
    monkeypatch.setenv("LLAMA_ARG_N_PREDICT", "1")
    monkeypatch.setenv("GGML_CPU_DISABLE_FUSION", "1")
    bindir = tmp_path / "bin"
    bindir.mkdir(mode=0o755)
    (bindir / "llama-perplexity").write_text(
        f"#!/bin/sh\nenv; ls /proc | grep -c '^[0-9]'; ls {os.environ['LAB_CACHE']} 2>&1; head -c 20 \"$2\"\n")
    (bindir / "llama-perplexity").chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_text("GGUF-model-bytes")
    out, _ = lc["oracle"].Tools(bindir, model, "cpu").run("llama-perplexity", [])
    assert "LLAMA_ARG" not in out and "GGML_" not in out and "PATH=" in out
    assert "No such file" in out and "GGUF-model-bytes" in out
    if sandbox.mode() == "bwrap":
        count = next(line for line in out.splitlines() if line.strip().isdigit())
        assert int(count) <= 4  # its own PID namespace: the runner is not there


# --- the surface and its guard ----------------------------------------------------------------------
def test_editable_surface(lc):
    h = lc["harness"]
    assert h.is_editable("ggml/src/ggml-cpu/ops.cpp")
    assert h.is_editable("ggml/src/ggml-cpu/arch/x86/quants.c")
    assert h.is_editable("ggml/src/ggml-cuda/mmvq.cu")
    for locked in ("tools/llama-bench/llama-bench.cpp", "common/arg.cpp", "ggml/src/ggml.c",
                   "ggml/src/ggml-cpu.c", "CMakeLists.txt", "src/llama-model.cpp"):
        assert not h.is_editable(locked), locked
    assert h.locked_files() and not any(h.is_editable(p) for p in h.locked_files())


def test_solutions_are_listed_and_the_guard_sorts_them(lc):
    h = lc["harness"]
    for rel, case in expected(HARNESS).items():  # every shipped patch (tests/solutions.py)
        verdict = case.status
        patch = (SOLUTIONS / rel).read_text()
        if verdict == "REJECTED":
            with pytest.raises(PatchRejected, match="outside the editable surface"):
                guard_patch(patch, h)
        else:
            assert all(h.is_editable(p) for p in guard_patch(patch, h))


def test_only_sources_of_the_backends_are_editable(lc):
    """Build files and scripts under the editable roots are locked: nothing a candidate writes runs
    at build time (CMake would run a CMakeLists.txt's commands with the build folder writable)."""
    h = lc["harness"]
    for rel in ("ggml/src/ggml-cpu/ops.cpp", "ggml/src/ggml-cpu/vec.h", "ggml/src/ggml-cuda/mmvq.cu",
                "ggml/src/ggml-cuda/common.cuh"):
        assert h.is_editable(rel), rel
    for rel in ("ggml/src/ggml-cpu/CMakeLists.txt", "ggml/src/ggml-cpu/cmake/FindSIMD.cmake",
                "ggml/src/ggml-cuda/template-instances/generate_cu_files.py", "ggml/src/ggml-cpu/build.sh",
                "ggml/src/ggml.c", "src/llama.cpp"):
        assert not h.is_editable(rel), rel


# --- the build overlay -----------------------------------------------------------------------------
def test_overlay_rewrites_only_what_differs(lc, tmp_path):
    b = lc["build"]
    h = lc["harness"]
    src, staged = tmp_path / "src", tmp_path / "staged"
    for tree in (src, staged):
        (tree / "ggml/src/ggml-cpu").mkdir(parents=True)
        (tree / "ggml/src/ggml-cpu/same.c").write_text("int same;\n")
        (tree / "ggml/src/ggml-cpu/edited.c").write_text("int a;\n")
    (src / "ggml/src/ggml-cpu/gone.c").write_text("int gone;\n")
    (src / "tools").mkdir()
    (src / "tools/bench.cpp").write_text("locked\n")
    (staged / "ggml/src/ggml-cpu/edited.c").write_text("int b;\n")
    (staged / "ggml/src/ggml-cpu/new.h").write_text("#pragma once\n")
    before = (src / "ggml/src/ggml-cpu/same.c").stat().st_mtime_ns
    changed = b.overlay(src, staged, h.is_editable, ("ggml/src/ggml-cpu", "ggml/src/ggml-cuda"))
    assert sorted(changed) == ["ggml/src/ggml-cpu/edited.c", "ggml/src/ggml-cpu/gone.c", "ggml/src/ggml-cpu/new.h"]
    assert (src / "ggml/src/ggml-cpu/edited.c").read_text() == "int b;\n"
    assert not (src / "ggml/src/ggml-cpu/gone.c").exists()
    assert (src / "ggml/src/ggml-cpu/same.c").stat().st_mtime_ns == before  # Ninja will not rebuild it
    assert (src / "tools/bench.cpp").read_text() == "locked\n"


def test_cmake_flags(lc):
    Flavor = lc["build"].Flavor
    cpu = " ".join(Flavor("cpu").cmake_args())
    assert "-DLLAMA_BUILD_SERVER=OFF" in cpu and "-DGGML_NATIVE=ON" in cpu and "-DLLAMA_BUILD_COMMIT=0c1e57098" in cpu
    cuda = " ".join(Flavor("cuda", "90").cmake_args())
    assert "-DGGML_CUDA=ON" in cuda and "-DCMAKE_CUDA_ARCHITECTURES=90" in cuda and "-DGGML_NATIVE=OFF" in cuda
    assert "test-backend-ops" in Flavor("cuda", "90").tools and "test-backend-ops" not in Flavor("cpu").tools
    assert "lab-llama-driver" in Flavor("cpu").tools and "lab-llama-driver" in Flavor("cuda", "90").tools


# --- the CUDA path's op check (no GPU here: a fake test-backend-ops) ---------------------------------
def test_touched_cuda_ops(lc):
    o = lc["oracle"]
    assert o.touched_cuda_ops(["ggml/src/ggml-cuda/mmvq.cu", "ggml/src/ggml-cuda/norm.cu"]) == ("MUL_MAT", "RMS_NORM")
    assert o.touched_cuda_ops(["ggml/src/ggml-cuda/common.cuh"]) == o.DECODE_OPS
    assert o.touched_cuda_ops(["ggml/src/ggml-cpu/ops.cpp"]) == ()


@pytest.mark.parametrize("mul_mat_line,passed", [("1021/1021 tests passed", True), ("1020/1021 tests passed", False),
                                                  ("0/0 tests passed", False)])  # a filter that matched nothing
def test_cuda_op_check_reads_test_backend_ops(lc, tmp_path, mul_mat_line, passed, monkeypatch):
    monkeypatch.setenv("LAB_SANDBOX", "off")  # the fake tool logs its argv into tmp_path
    o = lc["oracle"]
    script = tmp_path / "test-backend-ops"
    # argv: test -b CUDA0 -j N -o OP [-p FILTER]; the arguments are logged for the assertions below
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/argv\n"
                      f"if [ \"$7\" = MUL_MAT ]; then echo '  {mul_mat_line}'; else echo '  7/7 tests passed'; fi\n")
    script.chmod(0o755)
    model = write_gguf(tmp_path / "m.gguf", {"w": np.zeros((2, 8), np.float32)}, {"general.architecture": "x"})
    lines = []
    item = o._cuda_ops(o.Tools(tmp_path, model, "cuda"), ("MUL_MAT", "RMS_NORM"), lines)
    assert item.passed is passed and (passed or f"MUL_MAT: {mul_mat_line.split()[0]} tests passed" in item.detail)
    assert lines and "CUDA ops" in lines[0]
    # MUL_MAT's cases are cut to the model's weight types (here f32) and the f16/f32 ones
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[0].endswith("-o MUL_MAT -p type_a=(f16|f32),") and argv[1].endswith("-o RMS_NORM")


def test_a_locked_file_changed_in_the_working_tree_is_noticed(lc, tmp_path):
    """The build starts again from the pinned tree when a file outside the surface changed."""
    b, h = lc["build"], lc["harness"]
    (tmp_path / "ggml/src/ggml-cpu").mkdir(parents=True)
    (tmp_path / "tools").mkdir()
    (tmp_path / "ggml/src/ggml-cpu/ops.cpp").write_text("int a;\n")
    (tmp_path / "tools/bench.cpp").write_text("int t_ns;\n")
    before = b._locked_manifest(tmp_path, h.is_editable)
    (tmp_path / "ggml/src/ggml-cpu/ops.cpp").write_text("int b;\n")  # the surface: allowed
    assert b._locked_manifest(tmp_path, h.is_editable) == before
    (tmp_path / "tools/bench.cpp").write_text("int t_ns_halved;\n")
    assert b._locked_manifest(tmp_path, h.is_editable) != before


# --- the source: a clone at the pinned commit, else the sdist ------------------------------------
def _upstream(tmp_path: Path) -> tuple[Path, str, str]:
    """A tiny git repository standing in for llama.cpp: (path, commit, tree hash)."""
    up = tmp_path / "upstream"
    (up / "ggml").mkdir(parents=True)
    (up / "ggml" / "a.c").write_text("int a;\n")
    git(up, "init", "-q", "-b", "master", ".")
    git(up, "add", "-A")
    git(up, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return up, git(up, "rev-parse", "HEAD").strip(), git(up, "rev-parse", "HEAD^{tree}").strip()


def test_clone_tree_takes_the_pinned_commit_and_checks_its_tree(lc, tmp_path):
    s = lc["source"]
    up, commit, tree = _upstream(tmp_path)
    s.clone_tree(str(up), commit[:9], tree, tmp_path / "ok")
    assert (tmp_path / "ok" / "ggml" / "a.c").read_text() == "int a;\n"
    with pytest.raises(EnvironmentUnavailable, match=f"has the tree {tree}, not the pinned 0000"):
        s.clone_tree(str(up), commit, "0000", tmp_path / "other")
    with pytest.raises(EnvironmentUnavailable, match="git clone .* failed"):
        s.clone_tree(str(tmp_path / "nowhere"), commit, tree, tmp_path / "none")
    with pytest.raises(EnvironmentUnavailable, match="does not answer"):  # port 9 (discard): nothing listens
        s.clone_tree("http://127.0.0.1:9/llama.cpp", commit, tree, tmp_path / "net")


def test_the_pinned_tree_is_read_from_git_objects_whatever_is_checked_out(lc, tmp_path, monkeypatch):
    """export_pristine and pristine_file take the pinned tree's bytes by its hash (lab.sdk's git):
    a later commit or a dirty checkout changes nothing they give; a missing tree is a clear error."""
    s = lc["source"]
    up, commit, tree = _upstream(tmp_path)
    monkeypatch.setattr(s, "TREE_HASH", tree)
    (up / "ggml" / "a.c").write_text("int changed;\n")
    (up / "ggml" / "b.c").write_text("int b;\n")
    git(up, "add", "-A")
    git(up, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "two")
    (up / "ggml" / "a.c").write_text("int dirty;\n")
    s.export_pristine(up, tmp_path / "out", ("ggml",))
    assert sorted(p.name for p in (tmp_path / "out" / "ggml").iterdir()) == ["a.c"]
    assert (tmp_path / "out" / "ggml" / "a.c").read_text() == "int a;\n"
    assert s.pristine_file(up, "ggml/a.c") == b"int a;\n"
    assert s.pristine_blobs(up, ("ggml",)) == {"ggml/a.c": s.blob_hash(tmp_path / "out" / "ggml" / "a.c")}
    monkeypatch.setattr(s, "TREE_HASH", "1" * 40)
    with pytest.raises(EnvironmentUnavailable, match="git archive .*failed .*not a tree"):
        s.export_pristine(up, tmp_path / "none")


@pytest.mark.parametrize("how", ["auto", "git", "sdist"])
def test_prepare_tree_clones_or_falls_back_to_the_sdist(lc, tmp_path, monkeypatch, how):
    """auto: the clone when its tree is the pinned one, else the sdist; git: the clone or an error."""
    s = lc["source"]
    up, commit, tree = _upstream(tmp_path)
    monkeypatch.setattr(s, "COMMIT", commit[:9])
    monkeypatch.setattr(s, "TREE_HASH", tree)
    monkeypatch.setenv("LAB_LLAMACPP_SOURCE", how)
    unpacked = []

    def fake_sdist(sdist, dest):  # the sdist's tree is the same bytes
        unpacked.append(sdist)
        shutil.copytree(up, dest, dirs_exist_ok=True)

    monkeypatch.setattr(s, "fetch_sdist", lambda home: home / "sdist.tar.gz")
    monkeypatch.setattr(s, "_unpack_sdist", fake_sdist)
    monkeypatch.setenv("LAB_LLAMACPP_GIT_URL", str(up))
    repo = s.prepare_tree(tmp_path / "home")
    assert s._has_tree(repo) and bool(unpacked) == (how == "sdist")
    assert s.origin(tmp_path / "home").startswith("git" if how != "sdist" else "sdist")

    # a clone whose tree is not the pinned one: auto falls back and says why, git refuses
    other = tmp_path / "home2"
    monkeypatch.setattr(s, "TREE_HASH", "1" * 40)
    monkeypatch.setattr(s, "_has_tree", lambda r: (r / "ggml").is_dir())
    if how == "git":
        with pytest.raises(EnvironmentUnavailable, match="not the pinned 1111"):
            s.prepare_tree(other)
        return
    s.prepare_tree(other)
    record = json.loads((other / "tree" / f"{commit[:9]}.origin.json").read_text())
    assert record["source"].startswith("sdist")
    if how == "auto":
        assert "not the pinned 1111" in record["git_failed"]


def test_an_unknown_source_setting_is_refused(lc, tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_LLAMACPP_SOURCE", "svn")
    with pytest.raises(EnvironmentUnavailable, match="LAB_LLAMACPP_SOURCE='svn': use one of auto, git, sdist"):
        lc["source"].prepare_tree(tmp_path)


def test_gpu_idle_share_averages_the_readings_inside_the_generation(lc, tmp_path, monkeypatch):
    """NVML says 60% busy while a (fake) llama-bench generates for 1 s: 40% idle."""
    import importlib

    import lab.system.telemetry as telemetry

    profile = importlib.import_module(lc["oracle"].__name__.rsplit(".", 1)[0] + ".profile")
    bench = tmp_path / "llama-bench"
    bench.write_text("#!/bin/sh\nsleep 1.2\n"
                     "echo '{\"n_prompt\": 0, \"n_gen\": 1024, \"samples_ns\": [500000000, 500000000]}'\n")
    bench.chmod(0o755)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    tmp_path.chmod(0o755)  # a build folder: readable by the sandbox's user

    class FakeNVML:
        class NVMLError(Exception):
            pass

        def nvmlDeviceGetHandleByIndex(self, index):
            return f"gpu{index}"

        def nvmlDeviceGetUtilizationRates(self, handle):
            return type("Rates", (), {"gpu": 60})()

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(telemetry, "open_nvml", lambda: FakeNVML())
    line = profile.gpu_busy(tmp_path, tmp_path / "m.gguf")
    assert line.startswith("GPU idle between kernels: 40% of the generation (NVML utilization 60%"), line
    assert "tg1024 x 2, 0.49 ms per token" in line
    monkeypatch.setattr(telemetry, "open_nvml", lambda: None)
    assert profile.gpu_busy(tmp_path, tmp_path / "m.gguf") == "GPU idle between kernels: no NVML here"


@pytest.mark.skipif(shutil.which("perf") is None, reason="perf is not installed (linux-perf)")
def test_cpu_profile_runs_the_build_in_the_sandbox(lc, tmp_path):
    """The profile runs the candidate's llama-bench (here a fake that burns CPU, then tries to
    leave a file in the host's folder) under perf, inside the sandbox: the digest comes back and
    the file is not written."""
    import importlib

    profile = importlib.import_module(lc["oracle"].__name__.rsplit(".", 1)[0] + ".profile")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "escaped"
    (bindir / "llama-bench").write_text(
        "#!/bin/sh\ni=0; while [ $i -lt 300000 ]; do i=$((i+1)); done\n"
        f"echo x > {marker} 2>/dev/null\n"
        "echo '{\"n_gen\": 128, \"avg_ts\": 5.5}'\n")
    (bindir / "llama-bench").chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    digest = profile.cpu_digest(bindir, model, 1, "0x1")
    assert digest.startswith("profile: perf, cpu-clock samples"), digest
    assert "5.5 tokens/s" in digest and "by kind" in digest, digest
    assert not marker.exists()


# --- the driver: the timed run is the checked run (issue 20) -----------------------------------------
def _scored(rows, top=None, n_prompt=7, n_vocab=4):
    return {"n_prompt": n_prompt, "n_vocab": n_vocab, "rows": rows, "top": top or [[0, 5.0], [1, 4.0], [2, 1.0]]}


def _answer(d, tokens, final=None, n_prompt=7):
    final = final or {"top": [[0, 5.0], [1, 4.0]], "sumsq": 42.0}
    return d.Answer(tokens=tokens, n_prompt=n_prompt, final=final, seconds=1.0, wall_seconds=1.0, reported_s=0.9)


def test_verify_accepts_the_reference_stream_and_near_ties_only(lc):
    d = lc["driver"]
    # rows: [argmax, max logit, logit of the candidate's token, sum of squares]; RMS = sqrt(42/4)
    eps = d.TIE_REL * math.sqrt(42 / 4)
    exact = [[1, 5.0, 5.0, 42.0], [2, 6.0, 6.0, 42.0], [0, 5.0, 5.0, 42.0]]
    assert d.verify(_answer(d, [1, 2]), _scored(exact), n_gen=2) == []
    tie = [[1, 5.0, 5.0 - eps / 2, 42.0], [2, 6.0, 6.0, 42.0], [0, 5.0, 5.0, 42.0]]
    assert d.verify(_answer(d, [3, 2]), _scored(tie), n_gen=2) == []
    gap = [[1, 5.0, 5.0 - 2 * eps, 42.0], [2, 6.0, 6.0, 42.0], [0, 5.0, 5.0, 42.0]]
    assert "token 0 is 3" in d.verify(_answer(d, [3, 2]), _scored(gap), n_gen=2)[0]
    assert "returned 1 tokens" in d.verify(_answer(d, [1]), _scored(exact), n_gen=2)[0]
    assert "tokenised the prompt" in d.verify(_answer(d, [1, 2], n_prompt=6), _scored(exact), n_gen=2)[0]


def test_verify_holds_the_final_logits_to_the_reference(lc):
    d = lc["driver"]
    rows = [[1, 5.0, 5.0, 42.0], [0, 5.0, 5.0, 42.0]]
    assert d.verify(_answer(d, [1]), _scored(rows), n_gen=1) == []
    low = {"top": [[0, 5.0], [1, 3.9]], "sumsq": 42.0}  # one logit off by 0.1 (precision lowered)
    assert "token 1 has logit 3.9" in d.verify(_answer(d, [1], low), _scored(rows), n_gen=1)[0]
    scaled = {"top": [[0, 5.0], [1, 4.0]], "sumsq": 44.0}
    assert "RMS" in d.verify(_answer(d, [1], scaled), _scored(rows), n_gen=1)[0]
    stranger = {"top": [[0, 5.0], [3, 4.0]], "sumsq": 42.0}
    assert "not in the reference's top 64" in d.verify(_answer(d, [1], stranger), _scored(rows), n_gen=1)[0]


def test_driver_prompts_come_from_the_seed(lc):
    d, o = lc["driver"], lc["oracle"]
    words = o.corpus_words()
    a, b = d.prompt(words, 1), d.prompt(words, 2)
    assert a != b and a == d.prompt(words, 1) and 12 <= len(a.split()) <= 24
    assert len(set(o.probe_seeds([5, 6]))) == o.N_PROBES


def test_the_greedy_probes_end_at_the_first_that_differs(lc):
    """One differing probe fails the check; the later ones are not run (a wrong candidate's
    evaluation is two driver runs and scorings shorter), and the line says so."""
    from lab.sdk import Sample

    o = lc["oracle"]
    asked = []

    def greedy(answers):
        def run(seed):
            asked.append(seed)
            ok = answers[len(asked) - 1]
            return Sample(seconds=1.0, value=64.0, ok=ok, detail="final logits abc" if ok else "token 3 is 9")
        return run

    seeds = o.probe_seeds([5, 6])
    lines, hashes = [], {}
    item = o._greedy(greedy([True, False, True]), seeds, lines, hashes)
    assert not item.passed and asked == seeds[:2] and item.values["ran"] == 2
    assert "probe 1: token 3 is 9" in item.detail and hashes == {"greedy:probe0": "abc"}
    assert lines[0].startswith(f"greedy tokens: probe 1 of {o.N_PROBES} differs") and "not run" in lines[0]
    asked.clear()
    lines, hashes = [], {}
    item = o._greedy(greedy([True] * o.N_PROBES), seeds, lines, hashes)
    assert item.passed and asked == seeds and len(hashes) == o.N_PROBES
    assert lines[0].startswith(f"greedy tokens: {o.N_PROBES}/{o.N_PROBES} probes match")


def _fake_driver(tmp_path, body: str):
    """A stand-in for lab-llama-driver (same protocol), in the driver's own sandbox."""
    bindir = tmp_path / "bin"
    bindir.mkdir(mode=0o755, exist_ok=True)
    script = bindir / "lab-llama-driver"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    script.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_text("model")
    d = lc_driver()
    box = d.box(bindir, model, gpu=False)
    box.python = True
    return d, box, d.argv(box, bindir, model, threads=1, gpu_layers=0)


def lc_driver():
    import importlib

    return importlib.import_module(type(load(HARNESS)).__module__.rsplit(".", 1)[0] + ".driver")


READY = 'print(json.dumps({"event": "ready"}), flush=True)\nline = sys.stdin.readline()\n'
ANSWER = ('print(json.dumps({"n_prompt": 5, "tokens": list(range(int(line.split()[0]))), '
          '"final": {"top": [[1, 2.0]], "sumsq": 1.0}, "prefill_us": 1000, "decode_us": 2000}), flush=True)\n')


def test_the_driver_is_timed_on_the_harness_clock(tmp_path):
    d, box, cmd = _fake_driver(tmp_path, READY + "time.sleep(0.2)\n" + ANSWER)
    answer = d.run_once(box, cmd, "a secret prompt", n_gen=4)
    assert answer.tokens == [0, 1, 2, 3] and answer.n_prompt == 5
    assert 0.2 <= answer.seconds < answer.process_seconds and answer.reported_s == pytest.approx(0.003)


@pytest.mark.parametrize("body,reason", [
    ("sys.exit(3)", "exited with status 3 before answering"),
    (READY + "print('not json', flush=True)", "not a protocol line"),
    (READY + 'print(json.dumps({"error": "llama_decode"}), flush=True)', "the driver failed: llama_decode"),
    (READY + ANSWER + "time.sleep(60)", "did not exit"),
])
def test_a_driver_that_breaks_the_protocol_fails_the_sample(tmp_path, body, reason, monkeypatch):
    d, box, cmd = _fake_driver(tmp_path, body)
    monkeypatch.setattr(d, "EXIT_TIMEOUT_S", 2.0)
    with pytest.raises(d.DriverFailed, match=reason):
        d.run_once(box, cmd, "prompt", n_gen=4)


@pytest.mark.skipif(sandbox.mode() != "bwrap" or sandbox.describe() == "unavailable", reason="needs bubblewrap")
def test_nothing_the_driver_starts_outlives_it(tmp_path):
    """A daemon (own session, double fork) started by the timed process dies with its sandbox."""
    marker = f"lab-outlive-{os.getpid()}"
    daemon = (f"if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execvp('sh', ['sh', '-c', 'exec -a {marker} sleep 300'])\n    os._exit(0)\n")
    d, box, cmd = _fake_driver(tmp_path, daemon + READY + ANSWER)
    d.run_once(box, cmd, "prompt", n_gen=2)
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert not left.strip(), f"a process outlived the driver: {left}"
