"""DockerEnv for real: commands and a whole evaluation run inside the image that test_publish.py
publishes to the loopback registry and pulls back by digest (no network, the CPU set honoured,
timeouts killed, no secrets, read-only mounts). Also, without an engine: the errors a user sees,
the choice of image, and NixEnv with the structure of flake.nix (Nix is not installed here).
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lab.envs import Mount, get
from lab.errors import EnvironmentUnavailable
from lab.harness import load

from conftest import REPO
from conftest import locked_copy

PROBE_NETWORK = """
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    print("connected")
except OSError as exc:
    print("refused", exc)
"""


@pytest.fixture
def env(published, docker_client):
    from lab.envs.docker import DockerEnv

    harness, _, _ = published
    return DockerEnv(harness, client=docker_client)


def _runner_containers(client) -> set[str]:
    """The ids of the runner containers on the engine (another run's may be there already: an
    engine is shared, and a test asserts only about the containers it started)."""
    return {c.id for c in client.containers.list(all=True, filters={"label": "org.lab.role=runner"})}


# --- with an engine ---------------------------------------------------------------------------
@pytest.mark.docker
@pytest.mark.slow
def test_the_environment_is_named_by_the_image_digest(env, published):
    _, record, _ = published
    assert env.reference() == record["image"]
    assert env.path_of(Mount(Path("/somewhere"), "/lab/work")) == "/lab/work"


@pytest.mark.docker
@pytest.mark.slow
def test_the_container_has_no_network_unless_asked(env):
    port = os.environ.get("LAB_REGISTRY_ADDR", "127.0.0.1:5000").rsplit(":", 1)[1]
    # The registry listens on the host's loopback: reachable with the host's network only.
    closed = env.run(["python", "-c", PROBE_NETWORK, port], mounts=[], timeout_s=60)
    assert closed.returncode == 0, closed.stderr
    assert closed.stdout.startswith("refused"), closed.stdout
    opened = env.run(["python", "-c", PROBE_NETWORK, port], mounts=[], timeout_s=60, network=True)
    assert opened.stdout.startswith("connected"), opened.stdout + opened.stderr
    interfaces = env.run(["cat", "/proc/net/dev"], mounts=[], timeout_s=60).stdout
    assert re.findall(r"^\s*(\w+):", interfaces, re.M) == ["lo"]


@pytest.mark.docker
@pytest.mark.slow
def test_the_cpu_set_is_honoured(env):
    cpu = max(os.sched_getaffinity(0))
    result = env.run(["grep", "Cpus_allowed_list", "/proc/self/status"], mounts=[], timeout_s=60,
                     cpus=[cpu])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == str(cpu)


@pytest.mark.docker
@pytest.mark.slow
def test_a_timeout_kills_and_removes_the_container(env, docker_client):
    before = _runner_containers(docker_client)
    start = time.monotonic()
    result = env.run(["sleep", "120"], mounts=[], timeout_s=3)
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - start < 30
    assert _runner_containers(docker_client) <= before


@pytest.mark.docker
@pytest.mark.slow
def test_secrets_and_the_host_environment_stay_out(env, monkeypatch):
    monkeypatch.setenv("HOST_ONLY_VARIABLE", "host")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-host")
    env.extra_env = {"GITHUB_TOKEN": "ghp-x", "LAB_EXTRA": "extra"}
    result = env.run(["env"], mounts=[], timeout_s=60,
                     env={"ANTHROPIC_API_KEY": "sk-given", "DB_PASSWORD": "pw", "aws_secret": "s",
                          "MY_CREDENTIALS": "c", "LAB_PLAIN": "plain"})
    seen = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert seen["LAB_PLAIN"] == "plain" and seen["LAB_EXTRA"] == "extra"
    assert seen["LAB_CACHE"] == "/cache"
    for name in ("ANTHROPIC_API_KEY", "GITHUB_TOKEN", "DB_PASSWORD", "aws_secret", "MY_CREDENTIALS",
                 "HOST_ONLY_VARIABLE"):
        assert name not in seen
    assert "sk-" not in result.stdout


@pytest.mark.docker
@pytest.mark.slow
def test_mounts_are_read_only_unless_asked_and_the_user_is_not_root(env, tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "given.txt").write_text("given")
    script = ("import os\n"
              "print(os.getuid(), open('/in/given.txt').read())\n"
              "open('/out/made.txt', 'w').write('made')\n"
              "try:\n    open('/in/x', 'w')\nexcept OSError as exc:\n    print('read-only', exc.errno)\n")
    result = env.run(["python", "-c", script], timeout_s=60,
                     mounts=[Mount(ro, "/in"), Mount(rw, "/out", read_only=False)])
    assert result.returncode == 0, result.stderr
    uid, given = result.stdout.splitlines()[0].split()
    assert uid != "0" and given == "given"
    assert "read-only 30" in result.stdout  # EROFS
    assert (rw / "made.txt").read_text() == "made"
    assert not (ro / "x").exists()


@pytest.mark.docker
@pytest.mark.slow
def test_a_check_of_cdot_runs_inside_the_pulled_image(published, docker_client, tmp_path):
    """The real runner, staged mounts and the build cache volume: the whole evaluation path."""
    from lab.envs.docker import DockerEnv
    from lab.evaluate import run_evaluation

    _, record, _ = published
    harness = load(locked_copy(tmp_path / "cdot"))
    env = DockerEnv(harness, image=record["image"], client=docker_client)
    outcome = run_evaluation(harness, harness.root, tmp_path / "work", env=env, mode="check")
    assert outcome.verdict.status == "PASS", (outcome.verdict, outcome.stderr_tail)
    assert outcome.evaluation.fingerprint["environment"] == record["image"]
    assert outcome.evaluation.candidate_build.artifact.startswith("/cache/")

    # --model: the file reaches the runner in the container (read-only mount) and the record says so
    model = tmp_path / "models" / "short.txt"
    model.parent.mkdir()
    model.write_text("4096\n")
    harness.use_model(model)
    outcome = run_evaluation(harness, harness.root, tmp_path / "work-model", env=env, mode="check")
    assert outcome.verdict.status == "PASS", (outcome.verdict, outcome.stderr_tail)
    assert outcome.evaluation.work["elements"] == 4096
    assert outcome.evaluation.fingerprint["model"]["sha256"] == harness.model_identity()["sha256"]


# --- without an engine ------------------------------------------------------------------------
def test_no_engine_names_the_fix(monkeypatch):
    pytest.importorskip("docker")
    from lab.envs.docker import DockerEnv

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    env = DockerEnv(image="127.0.0.1:5000/lab/x@sha256:" + "0" * 64)
    with pytest.raises(EnvironmentUnavailable, match=r"no Docker engine answers at "
                       r"unix:///nonexistent/docker.sock.*scripts/start-docker.sh.*--env native"):
        env.preflight()


def test_the_image_comes_from_the_override_the_harness_or_its_image_lock(tmp_path, monkeypatch):
    from lab.envs.docker import DockerEnv

    monkeypatch.delenv("LAB_IMAGE", raising=False)
    harness = load(locked_copy(tmp_path / "cdot"))
    with pytest.raises(EnvironmentUnavailable, match="lab publish cdot"):
        DockerEnv(harness).image
    locked = "127.0.0.1:5000/lab/cdot@sha256:" + "1" * 64
    (harness.root / "image.lock.json").write_text('{"image": "%s"}' % locked)
    assert DockerEnv(harness).image == locked
    monkeypatch.setenv("LAB_IMAGE", "elsewhere/lab@sha256:" + "2" * 64)
    assert DockerEnv(harness).image == "elsewhere/lab@sha256:" + "2" * 64
    assert DockerEnv(harness, image="given:tag").image == "given:tag"
    assert get("docker", harness).name == "docker"


def test_repository_strips_tags_and_digests_but_not_ports():
    from lab.envs.docker import repository

    assert repository("127.0.0.1:5000/lab/cdot@sha256:" + "a" * 64) == "127.0.0.1:5000/lab/cdot"
    assert repository("127.0.0.1:5000/lab/cdot:0.1.0-abc") == "127.0.0.1:5000/lab/cdot"
    assert repository("127.0.0.1:5000/lab/cdot") == "127.0.0.1:5000/lab/cdot"
    assert repository("debian:bookworm") == "debian"


# --- Nix ---------------------------------------------------------------------------------------
def test_nix_env_runs_the_shell_of_the_lab_flake(tmp_path):
    from lab.envs.nix import NixEnv

    harness = load(locked_copy(tmp_path / "cdot"))
    env = get("nix", harness)
    assert isinstance(env, NixEnv) and env.name == "nix"
    assert env.flake == REPO and env.shell == "cpu"  # cdot declares no shell and needs no GPU
    assert env.command(["python", "-m", "lab.runner"])[-5:] == [
        f"{REPO}#cpu", "--command", "python", "-m", "lab.runner"]
    assert env.extra_env["PYTHONPATH"] == str(REPO)
    assert env.path_of(Mount(tmp_path, "/lab/work")) == str(tmp_path)  # host paths, as natively
    assert re.match(rf"^nix:{re.escape(str(REPO))}#cpu@(flake\.lock|unlocked-flake\.nix):[0-9a-f]{{16}}$",
                    env.reference())


@pytest.mark.skipif(shutil.which("nix") is not None, reason="Nix is installed here")
def test_nix_env_without_nix_says_what_to_do(tmp_path):
    from lab.envs.nix import NixEnv

    with pytest.raises(EnvironmentUnavailable, match="Nix is not installed.*--env docker or --env native"):
        NixEnv().run(["true"], mounts=[], timeout_s=10)


def _nix_skeleton(text: str) -> str:
    """flake.nix with comments removed and string contents blanked (quotes kept), checking that
    every string and ${...} interpolation closes."""
    out, i, n = [], 0, len(text)
    stack = []  # open brackets, with '${' marking an interpolation
    while i < n:
        c = text[i]
        if text.startswith("#", i):
            i = text.index("\n", i) if "\n" in text[i:] else n
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            assert end >= 0, "unterminated /* comment"
            i = end + 2
        elif c == '"' or text.startswith("''", i):
            multi = c != '"'
            i += 2 if multi else 1
            while True:
                assert i < n, "unterminated string"
                if multi and text.startswith("'''", i) or multi and text.startswith("''$", i):
                    i += 3  # escaped '' or $
                elif multi and text.startswith("''\\", i):
                    i += 4
                elif multi and text.startswith("''", i):
                    i += 2
                    break
                elif not multi and text[i] == "\\":
                    i += 2
                elif not multi and text[i] == '"':
                    i += 1
                    break
                elif text.startswith("${", i):
                    depth, j = 1, i + 2
                    while depth:
                        assert j < n, "unterminated ${ interpolation"
                        depth += {"{": 1, "}": -1}.get(text[j], 0)
                        j += 1
                    out.append(_nix_skeleton(text[i + 2:j - 1]))
                    i = j
                else:
                    i += 1
            out.append('""')
        else:
            if c in "{[(":
                stack.append(c)
            elif c in "}])":
                assert stack and "{[(".index(stack.pop()) == "}])".index(c), f"unbalanced {c!r}"
            out.append(c)
            i += 1
    assert not stack, f"unclosed {''.join(stack)}"
    return "".join(out)


def test_flake_nix_is_well_formed_and_declares_both_shells():
    text = (REPO / "flake.nix").read_text()
    if shutil.which("nix-instantiate"):
        subprocess.run(["nix-instantiate", "--parse", str(REPO / "flake.nix")], check=True,
                       capture_output=True)
    skeleton = _nix_skeleton(text)  # balanced brackets, closed strings and interpolations
    assert re.search(r'nixpkgs\.url = "github:NixOS/nixpkgs/[0-9a-f]{40}";', text), "nixpkgs pinned by revision"
    assert re.search(r"outputs = \{ self, nixpkgs \}:", skeleton)
    assert "devShells = " in skeleton
    assert re.search(r"\bcpu = cpuShell pkgs;", skeleton) and re.search(r"\bcuda = cudaShell pkgs;", skeleton)
    assert "cudaPackages" in text and "/run/opengl-driver/lib" in text


@pytest.mark.docker
@pytest.mark.slow
def test_gpus_on_an_engine_without_gpu_support_name_the_fix(env, docker_client):
    import docker

    all_gpus = docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
    probe = docker_client.containers.create("local/debian:bookworm", ["true"], network_mode="none",
                                            device_requests=[all_gpus])
    try:
        probe.start()  # the engine refuses GPUs when the container starts, not when it is made
    except docker.errors.APIError:
        pass  # no GPU support, as on the machines without a GPU
    else:
        pytest.skip("this engine gives containers GPUs")
    finally:
        probe.remove(force=True)
    before = _runner_containers(docker_client)
    with pytest.raises(EnvironmentUnavailable, match="NVIDIA Container Toolkit"):
        env.run(["true"], mounts=[], timeout_s=60, gpus=[0])
    assert _runner_containers(docker_client) <= before


@pytest.mark.docker
@pytest.mark.slow
def test_the_containers_of_a_killed_lab_are_swept_and_no_one_elses(env, docker_client):
    """A lab killed by kill -9 cannot remove its runner's container, which may still be running
    on the cores a resumed run will time on: the next DockerEnv of this host kills and removes it.
    A live lab's container, another host's, and one without an owner are left alone."""
    import docker

    from lab.envs.docker import OWNER_LABEL, ROLE_LABEL
    from lab.system.process import owner_identity

    ended = subprocess.Popen(["true"])
    dead_owner = owner_identity(ended.pid)
    ended.wait()
    owners = {"killed": dead_owner, "live": owner_identity(),
              "elsewhere": "another-host/machine/boot/1/1/1", "unlabelled": None}
    made = {}
    try:
        for what, owner in owners.items():
            labels = {ROLE_LABEL: "runner", **({OWNER_LABEL: owner} if owner else {})}
            made[what] = docker_client.containers.run("local/debian:bookworm", ["sleep", "600"],
                                                      detach=True, network_mode="none", labels=labels)
        env.run(["true"], mounts=[], timeout_s=60)
        left = _runner_containers(docker_client)
        assert made["killed"].id not in left
        assert {made[w].id for w in ("live", "elsewhere", "unlabelled")} <= left
    finally:
        for container in made.values():
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass  # swept


class _FakeImage:
    id = "sha256:" + "f" * 64
    attrs = {"Config": {"User": "1000:1000"}, "RepoDigests": []}


class _FakeContainer:
    def wait(self, timeout):
        return {"StatusCode": 3}

    def logs(self, stdout, stderr):
        return b"out" if stdout else b"err"


class _FakeClient:
    """Records what DockerEnv asks of the engine (for what this machine cannot show: GPUs)."""

    def __init__(self):
        self.run_kwargs, self.removed = None, []
        self.images = type("Images", (), {"get": lambda _, ref: _FakeImage()})()
        self.containers = type("Containers", (), {"get": lambda _, cid: _FakeContainer()})()
        client = self

        class Api:
            def create_host_config(self, **kwargs):
                return dict(kwargs)

            def create_container(self, image, command, host_config=None, **kwargs):
                client.run_kwargs = {"image": image, "command": command, **kwargs, **host_config}
                return {"Id": "c1"}

            def start(self, cid):
                pass

            def remove_container(self, name, **kw):
                client.removed.append(name)

            def containers(self, **kw):
                return []  # no runner container of a killed lab to sweep

        self.api = Api()


def test_the_container_request_carries_gpus_cpus_mounts_and_no_network(tmp_path, monkeypatch):
    docker = pytest.importorskip("docker")
    from lab.envs.docker import CACHE_VOLUME, DockerEnv
    from lab.system.process import owner_identity

    harness = load(locked_copy(tmp_path / "cdot"))
    monkeypatch.setattr(type(harness), "environment",
                        type(harness.environment)(image="r/lab@sha256:" + "0" * 64, needs_gpu=True))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # an unprivileged lab: no chown
    client = _FakeClient()
    env = DockerEnv(harness, client=client)
    result = env.run(["python", "-m", "lab.runner"], timeout_s=10, cpus=[0, 1], gpus=[1],
                     mounts=[Mount(tmp_path, "/lab/harness"), Mount(tmp_path / "w", "/lab/work", read_only=False),
                             Mount(tmp_path / "c", "/cache", read_only=False)])
    assert (result.returncode, result.stdout, result.stderr, result.timed_out) == (3, "out", "err", False)
    kw = client.run_kwargs
    assert kw["image"] == _FakeImage.id and kw["command"] == ["python", "-m", "lab.runner"]
    assert kw["network_mode"] == "none" and kw["cpuset_cpus"] == "0,1" and kw["detach"]
    assert kw["user"] == f"{os.getuid()}:{os.getgid()}"
    # No capabilities, no new privileges; Docker's seccomp, AppArmor and /proc masks lifted for
    # bubblewrap, which sandboxes the candidate inside (lab/envs/docker.py).
    assert kw["cap_drop"] == ["ALL"] and "no-new-privileges" in kw["security_opt"]
    assert kw["MaskedPaths"] == [] and "seccomp=unconfined" in kw["security_opt"]
    assert kw["binds"] == {CACHE_VOLUME: {"bind": "/cache", "mode": "rw"},
                             str(tmp_path): {"bind": "/lab/harness", "mode": "ro"},
                             str(tmp_path / "w"): {"bind": "/lab/work", "mode": "rw"}}
    (request,) = kw["device_requests"]
    assert isinstance(request, docker.types.DeviceRequest)
    assert request["DeviceIDs"] == ["1"] and request["Capabilities"] == [["gpu"]]
    assert kw["environment"]["LAB_CACHE"] == "/cache"
    assert kw["labels"] == {"org.lab.role": "runner", "org.lab.owner": owner_identity()}
    assert client.removed == [kw["name"]]
    # A GPU harness given no GPU list gets them all; a CPU list of none leaves the CPU set alone.
    env.run(["true"], mounts=[], timeout_s=10)
    (request,) = client.run_kwargs["device_requests"]
    assert request["Count"] == -1 and client.run_kwargs["cpuset_cpus"] is None
