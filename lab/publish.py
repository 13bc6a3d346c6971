"""Build, label and push a harness's image; record its digest in the harness's image.lock.json.

`publish` builds the Dockerfile the harness names (or the CPU/CUDA default) from a small build
context of the lab's own sources, the lock file of its Python dependencies and the wheels that
lock names, downloaded here and checked against their hashes, so that the build itself needs
no index. It tags `<registry>/lab/<harness>:<lab version>-<lock digest[:12]>`, pushes, forgets
the local tag, pulls the image back by digest, checks its labels and that the lab imports in it,
and only then writes the digest down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .envs.docker import connect, repository
from .errors import LabError
from .extras import require
from .git import run as git_run
from .harness import IMAGE_LOCK, Harness, repo_root, resolve_image  # noqa: F401 (resolve_image: lab.publish's API)

LABEL_VERSION = "org.opencontainers.image.version"
LABEL_HARNESS_LOCK = "org.lab.harness-lock"
LABEL_BASE_DIGEST = "org.opencontainers.image.base.digest"
BUILD_LOG_TAIL = 30


def default_dockerfile(harness: Harness) -> Path:
    name = harness.environment.dockerfile or ("Dockerfile.cuda" if harness.environment.needs_gpu
                                              else "Dockerfile.cpu")
    return repo_root() / name


def publish(harness: Harness, registry: str, *, dockerfile=None, base_image=None, tag=None,
            client=None) -> dict:
    """Build, push, verify and record the image of `harness`; return the image lock written."""
    client = client or connect(timeout_s=1800)
    dockerfile = Path(dockerfile) if dockerfile else default_dockerfile(harness)
    if not dockerfile.is_file():
        raise LabError(f"no Dockerfile at {dockerfile}; pass --dockerfile or set the harness's "
                       "environment.dockerfile")
    lock_digest = harness.lock_digest()
    repo = f"{registry.rstrip('/')}/lab/{harness.name}"
    tag = tag or f"{__version__}-{lock_digest[:12]}"
    base = base_image or dockerfile_default(dockerfile, "BASE_IMAGE")
    buildargs = build_args(harness.name, lock_digest, dockerfile, base, image_digest(client, base))
    with tempfile.TemporaryDirectory(prefix="lab-context-") as ctx:
        arch = client.info().get("Architecture") or "x86_64"
        build_context(Path(ctx), dockerfile, arch)
        image_id = build(client, ctx, buildargs, image_labels(harness, buildargs))
    client.api.tag(image_id, repo, tag)
    reference = f"{repo}@{push(client, repo, tag)}"
    pull_back(client, reference, f"{repo}:{tag}", {LABEL_VERSION: __version__,
                                                    LABEL_HARNESS_LOCK: buildargs["HARNESS_LOCK"],
                                                    LABEL_BASE_DIGEST: buildargs["BASE_DIGEST"]})
    record = {
        "image": reference,
        "tag": f"{repo}:{tag}",
        "dockerfile": _relative(dockerfile),
        "base_image": base,
        "base_digest": buildargs["BASE_DIGEST"],
        "lab_version": __version__,
        "harness_lock": lock_digest,
        "published": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (harness.root / IMAGE_LOCK).write_text(json.dumps(record, indent=1) + "\n")
    return record


def build_args(name: str, lock_digest: str, dockerfile: Path, base: str, base_digest: str) -> dict:
    """The Dockerfile's build arguments: the base pinned by digest, the lab's version, the lock."""
    return {
        "BASE_IMAGE": base,
        "BASE_DIGEST": base_digest,
        "LAB_VERSION": __version__,
        "HARNESS_LOCK": f"{name}={lock_digest}",
        "SOURCE_DATE_EPOCH": source_date_epoch(dockerfile),
    }


def image_labels(harness: Harness, buildargs: dict) -> dict:
    """Labels besides those the Dockerfile sets from the build arguments: the harness, the date
    (SOURCE_DATE_EPOCH, for a reproducible image) and the lab's commit where there is one."""
    labels = {
        "org.lab.harness": harness.name,
        "org.opencontainers.image.created": datetime.fromtimestamp(
            int(buildargs["SOURCE_DATE_EPOCH"]), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    revision = _git("rev-parse", "HEAD")
    if revision:
        labels["org.opencontainers.image.revision"] = revision
    return labels


def pull_back(client, reference: str, local_tag: str, expected_labels: dict) -> None:
    """Forget the local name, then take the image back from the registry by digest and verify it:
    what is recorded is what anyone pulling the digest gets."""
    docker = require("docker")
    client.api.remove_image(local_tag, noprune=True)  # keep the build cache
    try:
        pulled = client.images.pull(reference)
    except docker.errors.DockerException as exc:
        raise LabError(f"pushed {reference} but could not pull it back: {exc}") from None
    verify(client, pulled, reference, expected_labels)


# --- the build context ------------------------------------------------------------------------
def lock_file_of(dockerfile: Path) -> Path:
    """Dockerfile.<kind> installs requirements/<kind>.txt."""
    kind = dockerfile.name.split(".", 1)[1] if "." in dockerfile.name else "cpu"
    path = repo_root() / "requirements" / f"{kind}.txt"
    if not path.is_file():
        raise LabError(f"{dockerfile.name} needs the lock file {path}, which is missing")
    return path


def build_context(ctx: Path, dockerfile: Path, arch: str) -> None:
    """The lab's sources, the lock files and the locked wheels for `arch`, nothing else (no runs,
    no virtual environments, no secrets that may lie in the checkout)."""
    root = repo_root()
    shutil.copyfile(dockerfile, ctx / "Dockerfile")
    shutil.copyfile(root / "pyproject.toml", ctx / "pyproject.toml")
    readme = root / "README.md"
    (ctx / "README.md").write_text(readme.read_text() if readme.exists() else "# lab\n")
    shutil.copytree(root / "lab", ctx / "lab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(root / "requirements", ctx / "requirements")
    wheels = download_wheels(lock_file_of(dockerfile), arch)
    (ctx / "wheels").mkdir()
    for whl in wheels:
        shutil.copyfile(whl, ctx / "wheels" / whl.name)


def wheel_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lab-docker" / "wheels"


def download_wheels(lock_file: Path, arch: str) -> list[Path]:
    """The wheels `lock_file` pins for the image's Python and `arch`, checked against their
    hashes by pip (--require-hashes) and kept in a cache, so that a rebuild downloads nothing."""
    header = lock_file.read_text()
    py = re.search(r"CPython (\d+)\.(\d+)", header)
    glibc = re.search(r"glibc 2\.(\d+)", header)
    if not py or not glibc:
        raise LabError(f"{lock_file} does not say its target ('CPython X.Y, glibc 2.N' in its header)")
    dest = wheel_cache() / f"cp{py[1]}{py[2]}-{arch}"
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{v}_{arch}" for v in range(17, int(glibc[1]) + 1)]
    platforms += [f"manylinux2014_{arch}", f"linux_{arch}"]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", f"{py[1]}.{py[2]}",
           "--dest", str(dest), "-r", str(lock_file)]
    for p in platforms:
        cmd += ["--platform", p]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"could not download the wheels of {lock_file.name} for {arch}: "
                       + _tail(proc.stderr, 5))
    pins = {re.sub(r"[-_.]+", "_", m[0]).lower(): m[1]
            for m in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", header, re.M)}
    # Only the wheels of this lock (the cache may hold other versions of the same packages).
    return sorted(p for p in dest.glob("*.whl")
                  if pins.get(p.name.split("-")[0].lower()) == p.name.split("-")[1])


# --- build, push, verify ----------------------------------------------------------------------
def build(client, ctx: str, buildargs: dict, labels: dict) -> str:
    """Build with the engine's classic builder (host network: the default bridge is off)."""
    log: list[str] = []
    image_id = None
    stream = client.api.build(path=ctx, dockerfile="Dockerfile", buildargs=buildargs, labels=labels,
                              network_mode="host", rm=True, forcerm=True, pull=False, decode=True)
    for chunk in stream:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("error") or chunk["errorDetail"].get("message", "")
            raise LabError(f"the image build failed: {detail.strip()}\n" + "".join(log[-BUILD_LOG_TAIL:]))
        if "stream" in chunk:
            log.append(chunk["stream"])
            m = re.match(r"Successfully built ([0-9a-f]+)", chunk["stream"])
            if m:
                image_id = m[1]
        if isinstance(chunk.get("aux"), dict) and chunk["aux"].get("ID"):
            image_id = chunk["aux"]["ID"]
    if not image_id:
        raise LabError("the image build ended without an image:\n" + "".join(log[-BUILD_LOG_TAIL:]))
    return image_id


def push(client, repo: str, tag: str) -> str:
    """Push `repo:tag`; return its manifest digest. Any error in the stream is an error."""
    digest = None
    for chunk in client.api.push(repo, tag=tag, stream=True, decode=True):
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("error") or (chunk.get("errorDetail") or {}).get("message", "")
            raise LabError(f"push of {repo}:{tag} failed: {detail}; is the registry running "
                           "(scripts/start-registry.sh) and the name right?")
        aux = chunk.get("aux")
        if isinstance(aux, dict) and aux.get("Digest"):
            digest = aux["Digest"]
    if not digest:
        found = [d for d in client.images.get(f"{repo}:{tag}").attrs.get("RepoDigests") or []
                 if d.startswith(repo + "@")]
        if not found:
            raise LabError(f"push of {repo}:{tag} reported no digest")
        digest = found[0].split("@", 1)[1]
    return digest


def verify(client, image, reference: str, expected_labels: dict) -> None:
    """The pulled image carries the labels it was built with and the lab imports in it."""
    docker = require("docker")
    labels = image.labels or {}
    wrong = {k: labels.get(k) for k, v in expected_labels.items() if labels.get(k) != v}
    if wrong:
        raise LabError(f"{reference} carries unexpected labels: {wrong} (expected {expected_labels})")
    try:
        out = client.containers.run(image.id, ["python", "-c", "import lab; print(lab.__version__)"],
                                    network_mode="none", remove=True, stdout=True, stderr=True)
    except docker.errors.DockerException as exc:
        raise LabError(f"the lab does not import in {reference}: {exc}") from None
    if out.decode().strip() != __version__:
        raise LabError(f"{reference} holds lab {out.decode().strip()!r}, not {__version__}")


# --- small helpers ----------------------------------------------------------------------------
def image_digest(client, ref: str) -> str:
    """The digest a reference is pinned to, else the local image's repo digest, else its ID."""
    docker = require("docker")
    if "@sha256:" in ref:
        return ref.split("@", 1)[1]
    try:
        image = client.images.get(ref)
    except docker.errors.ImageNotFound:
        raise LabError(f"base image {ref} is not on this engine and not pinned by digest; pull it "
                       "or make it (scripts/start-docker.sh makes local/debian:bookworm)") from None
    for d in image.attrs.get("RepoDigests") or []:
        if d.split("@")[0] == repository(ref):
            return d.split("@", 1)[1]
    return image.id


def dockerfile_default(dockerfile: Path, arg: str) -> str:
    m = re.search(rf"^ARG {arg}=(\S+)", dockerfile.read_text(), re.M)
    if not m:
        raise LabError(f"{dockerfile} has no default for ARG {arg}; pass it explicitly")
    return m[1]


def source_date_epoch(dockerfile: Path) -> str:
    """SOURCE_DATE_EPOCH from the environment, else the lab's last commit, else the Dockerfile's."""
    return (os.environ.get("SOURCE_DATE_EPOCH") or _git("log", "-1", "--format=%ct")
            or dockerfile_default(dockerfile, "SOURCE_DATE_EPOCH"))


def _git(*args) -> str:
    """git in the lab's own checkout; "" when that fails (no git, not a checkout)."""
    try:
        proc = git_run(repo_root(), *args)
    except OSError:
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(repo_root()).as_posix()
    except ValueError:
        return str(path)


def _tail(text: str, lines: int) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])
