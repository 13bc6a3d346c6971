"""The runner in a container of the harness's pinned image (docker-py).

The container gets the mounts it is given (read-only unless asked), the CPU set, the GPUs it is
given, no network unless asked, no secrets, and a build-cache volume of its own; it runs as a
non-root user with no capabilities and no-new-privileges, and is always removed: by the run that
started it, or, when that lab process was killed (kill -9, a crash, a reboot), by the next DockerEnv
of this host, which sweeps the runner containers whose owner (OWNER_LABEL) is gone, so that an
orphan never keeps running on the cores a resumed run times on. The environment names itself by
the image's repo digest.

Candidate code gets the same sandbox as natively: the runner in the container starts it under
bubblewrap (lab/sandbox.py; the image has it), unprivileged, in a user namespace of its own. For
bwrap to build that namespace the container lifts three of Docker's defaults, for the runner's
container only (SANDBOX_HOST_CONFIG): the seccomp and AppArmor profiles (they forbid the
`unshare` and `mount` a sandbox needs) and the masks over /proc (the kernel mounts a new /proc,
the sandbox's own, only where the whole /proc is visible). Candidate code never runs outside
that sandbox; the runner refuses to start without it unless the user said --no-sandbox.
"""

from __future__ import annotations

import os
import re
import time
import uuid

from ..errors import EnvironmentUnavailable, LabError
from ..extras import require
from ..harness import resolve_image
from ..system.process import owner_gone, owner_identity
from .base import Env, Mount, RunResult
from .native import SECRET_MARKERS

# The runner's build cache inside the container: a named volume, apart from the host's cache, so
# that artifacts built with the image's toolchain never mix with native ones.
CACHE_VOLUME = "lab-build-cache"
CACHE_TARGET = "/cache"
NOBODY = "65534:65534"  # for an image that declares no non-root user
# What the runner's container needs so that bubblewrap can sandbox candidate code inside it.
SANDBOX_SECURITY_OPT = ["no-new-privileges", "seccomp=unconfined", "apparmor=unconfined"]
SANDBOX_HOST_CONFIG: dict[str, list] = {"MaskedPaths": [], "ReadonlyPaths": []}  # `--security-opt systempaths=unconfined`
ROLE_LABEL = "org.lab.role"  # "runner" on every container the lab starts
OWNER_LABEL = "org.lab.owner"  # the lab process that started it (system.process.owner_identity)


def engine_address() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect(timeout_s: float = 120):
    """A docker-py client of the engine that answers, or EnvironmentUnavailable saying what to do."""
    docker = require("docker")
    try:
        client = docker.from_env(timeout=int(timeout_s))
        client.ping()
    except docker.errors.DockerException as exc:
        raise EnvironmentUnavailable(
            f"no Docker engine answers at {engine_address()} ({_first_line(exc)}); start one "
            "(scripts/start-docker.sh) or use --env native"
        ) from None
    return client


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def repository(ref: str) -> str:
    """The repository of an image reference, without its tag or digest."""
    name = ref.split("@")[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    return name[:colon] if colon > slash else name


def secret_free(env: dict) -> dict:
    """`env` without the variables whose names look like secrets (the markers of native.py)."""
    return {k: v for k, v in env.items() if not any(m in k.upper() for m in SECRET_MARKERS)}


class DockerEnv(Env):
    def __init__(self, harness=None, image: str | None = None, client=None):
        super().__init__(name="docker")
        self.harness = harness
        self._image = image or os.environ.get("LAB_IMAGE") or ""
        self._client = client
        self._swept = False

    # --- what runs where -------------------------------------------------------------------
    @property
    def image(self) -> str:
        """The image reference: the override, else the harness's pin, else its image.lock.json."""
        if self._image:
            return self._image
        if self.harness is not None:
            if self.harness.environment.image:
                return self.harness.environment.image
            found = resolve_image(self.harness)
            if found:
                return found
        name = getattr(self.harness, "name", None)
        raise EnvironmentUnavailable(
            (f"harness '{name}' names no image and has no image.lock.json; publish one with "
             f"`lab publish {name} --registry 127.0.0.1:5000`" if name else "no image given")
            + ", or set LAB_IMAGE to an image reference"
        )

    @property
    def client(self):
        if self._client is None:
            self._client = connect()
        return self._client

    def preflight(self) -> None:
        self._image_object()

    def _image_object(self):
        """The image, pulled (by its digest) when the engine does not have it yet."""
        docker = require("docker")
        ref = self.image
        try:
            return self.client.images.get(ref)
        except docker.errors.ImageNotFound:
            pass
        try:
            return self.client.images.pull(ref)
        except docker.errors.DockerException as exc:
            raise EnvironmentUnavailable(
                f"image {ref} is neither on this engine nor pullable ({_first_line(exc)}); start the "
                "registry it lives in (scripts/start-registry.sh for 127.0.0.1:5000) or publish it "
                "again with `lab publish`"
            ) from None

    def reference(self) -> str:
        """The image's repo digest (repo@sha256:...) or, for an image never pushed, its ID."""
        image = self._image_object()
        digests = image.attrs.get("RepoDigests") or []
        if self.image in digests:
            return self.image
        repo = repository(self.image)
        for d in digests:
            if d.split("@")[0] == repo:
                return d
        return digests[0] if digests else image.id

    def path_of(self, mount: Mount) -> str:
        return mount.target

    # --- running ---------------------------------------------------------------------------
    def _user(self, image) -> str:
        """Who the runner is inside: the host user when the lab runs unprivileged (files it
        writes into writable mounts stay the user's), else the image's non-root user."""
        if os.geteuid() != 0:
            return f"{os.getuid()}:{os.getgid()}"
        user = (image.attrs.get("Config") or {}).get("User") or ""
        return NOBODY if user.split(":")[0] in ("", "0", "root") else user

    def run(self, argv, *, mounts, timeout_s, cpus=None, gpus=None, env=None, network=False, on_line=None):
        # on_line: not streamed from a container (its logs are read once it ends); the lab's
        # progress says only that the evaluation is running, with its elapsed time.
        image = self._image_object()
        user = self._user(image)
        child_env = secret_free({**self.extra_env, **(env or {})})
        child_env["LAB_CACHE"] = CACHE_TARGET
        start = time.monotonic()
        label = re.sub(r"[^a-zA-Z0-9_.-]", "-", getattr(self.harness, "name", "") or "run")
        name = f"lab-{label}-{uuid.uuid4().hex[:10]}"
        self._remove_orphans()
        container = self._start(image, argv, name, user, child_env, self._volumes(mounts, user),
                                self._device_requests(gpus), cpus=cpus, network=network)
        try:
            returncode, timed_out = self._wait(container, timeout_s - (time.monotonic() - start))
            stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
            stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
        finally:
            self._remove(name)
        return RunResult(returncode=returncode, stdout=stdout, stderr=stderr,
                         timed_out=timed_out, seconds=time.monotonic() - start)

    def _volumes(self, mounts, user: str) -> dict:
        """The binds: the build-cache volume, and every mount (a writable one handed to `user`)."""
        volumes = {CACHE_VOLUME: {"bind": CACHE_TARGET, "mode": "rw"}}
        for m in mounts:
            if m.target == CACHE_TARGET:
                continue  # the cache is the volume above, never a host folder
            host = os.path.abspath(m.host)
            if not m.read_only:
                _grant(host, user)
            volumes[host] = {"bind": m.target, "mode": "ro" if m.read_only else "rw"}
        return volumes

    def _device_requests(self, gpus) -> list:
        """The GPUs given (none for an empty list; every GPU for a GPU harness given None)."""
        docker = require("docker")
        if gpus:
            return [docker.types.DeviceRequest(device_ids=[str(g) for g in gpus], capabilities=[["gpu"]])]
        if gpus is None and self.harness is not None and self.harness.environment.needs_gpu:
            return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
        return []

    def _start(self, image, argv, name: str, user: str, child_env: dict, volumes: dict, device_requests: list,
               *, cpus, network: bool):
        """The runner's container, started: no capabilities, no network unless asked, the CPU set,
        and what bubblewrap needs inside (SANDBOX_HOST_CONFIG)."""
        docker = require("docker")
        try:
            api = self.client.api
            host_config = api.create_host_config(
                binds=volumes, network_mode="host" if network else "none",
                cpuset_cpus=",".join(str(c) for c in cpus) if cpus else None,
                device_requests=device_requests or None, cap_drop=["ALL"], security_opt=SANDBOX_SECURITY_OPT)
            host_config.update(SANDBOX_HOST_CONFIG)
            created = api.create_container(image.id, list(argv), name=name, user=user, environment=child_env,
                                           host_config=host_config,
                                           labels={ROLE_LABEL: "runner", OWNER_LABEL: owner_identity()},
                                           detach=True)
            api.start(created["Id"])
            return self.client.containers.get(created["Id"])
        except docker.errors.DockerException as exc:
            self._remove(name)
            if device_requests and "device driver" in str(exc):
                raise EnvironmentUnavailable(
                    f"the Docker engine at {engine_address()} cannot give containers GPUs "
                    f"({_first_line(exc)}); install the NVIDIA Container Toolkit and run "
                    "`nvidia-ctk runtime configure --runtime=docker`, or use --env native"
                ) from None
            raise LabError(f"could not start a container of {self.image}: {_first_line(exc)}") from None

    @staticmethod
    def _wait(container, timeout_s: float) -> tuple[int | None, bool]:
        """(exit status, timed out): waits at most `timeout_s` (1 s at least), then kills it."""
        docker = require("docker")
        from requests.exceptions import RequestException  # docker-py's transport

        try:
            return container.wait(timeout=max(1, timeout_s)).get("StatusCode"), False
        except RequestException:  # the wait timed out
            try:
                container.kill()
            except docker.errors.APIError:
                pass  # it ended in the meantime
            return None, True

    def _remove_orphans(self) -> None:
        """Once per environment: kill and remove the runner containers of this host whose lab
        process is gone. Another host's, another live lab's, and any without an owner label (not
        ours to judge) are left alone."""
        if self._swept:
            return
        self._swept = True
        docker = require("docker")
        try:
            found = self.client.api.containers(all=True, filters={"label": f"{ROLE_LABEL}=runner"})
        except docker.errors.DockerException:
            return  # the run itself will say what is wrong with the engine
        for c in found:
            owner = (c.get("Labels") or {}).get(OWNER_LABEL)
            if owner and owner_gone(owner):
                try:
                    self._remove(c["Id"])
                except docker.errors.APIError:
                    pass  # another lab is removing it

    def _remove(self, name: str) -> None:
        docker = require("docker")
        try:
            self.client.api.remove_container(name, force=True, v=False)
        except docker.errors.NotFound:
            pass


def _grant(host: str, user: str) -> None:
    """Let the container's user write a writable mount. Unprivileged, the container runs as the
    host user, who owns it already; as root, hand the folder (the lab's own work folder) over."""
    if os.geteuid() != 0:
        return
    uid, _, gid = user.partition(":")
    if not uid.isdigit():
        return
    uid_i, gid_i = int(uid), int(gid) if gid.isdigit() else int(uid)
    for dirpath, dirnames, filenames in os.walk(host):
        os.chown(dirpath, uid_i, gid_i)
        for f in filenames:
            os.chown(os.path.join(dirpath, f), uid_i, gid_i, follow_symlinks=False)
