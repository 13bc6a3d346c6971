"""Publishing a harness image for real: a Docker engine and a registry on loopback, both started
by this test session (scripts/start-docker.sh, scripts/start-registry.sh), the CPU image built
from Dockerfile.cpu on the offline base local/debian:bookworm, pushed, forgotten locally and
pulled back by digest. Without an engine these tests skip with the reason; under CI they fail.

The lock files and the Dockerfiles are also checked statically (no engine needed).
"""

import json
import re
from pathlib import Path

import pytest

from lab import __version__
from lab.errors import LabError
from lab.harness import load

from conftest import BASE, REGISTRY, REPO, locked_copy

DIGEST_REF = re.compile(r"^[^@]+@sha256:[0-9a-f]{64}$")


# --- with an engine ---------------------------------------------------------------------------
@pytest.mark.docker
@pytest.mark.slow
def test_publish_pins_the_image_by_digest_and_writes_the_image_lock(published, docker_client):
    harness, record, lock_digest = published
    repo = f"{REGISTRY}/lab/cdot"
    assert DIGEST_REF.match(record["image"]) and record["image"].startswith(repo + "@"), record
    assert record["tag"] == f"{repo}:{__version__}-{lock_digest[:12]}"
    assert record["harness_lock"] == lock_digest
    assert record["lab_version"] == __version__
    assert record["base_image"] == BASE and record["base_digest"].startswith("sha256:")
    assert record["dockerfile"] == "Dockerfile.cpu"
    assert json.loads((harness.root / "image.lock.json").read_text()) == record

    from lab.publish import resolve_image

    assert resolve_image(harness) == record["image"]
    # The local tag is gone: only the digest names the image here.
    tags = [t for img in docker_client.images.list() for t in img.tags]
    assert record["tag"] not in tags


@pytest.mark.docker
@pytest.mark.slow
def test_the_pulled_image_carries_its_labels_and_a_non_root_user(published, docker_client):
    _, record, lock_digest = published
    image = docker_client.images.get(record["image"])
    labels = image.labels
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.lab.harness-lock"] == f"cdot={lock_digest}"
    assert labels["org.opencontainers.image.base.digest"] == record["base_digest"]
    assert labels["org.opencontainers.image.base.name"] == BASE
    assert re.match(r"^\d{4}-\d\d-\d\dT", labels["org.opencontainers.image.created"])
    user = image.attrs["Config"]["User"]
    assert user and user.split(":")[0] not in ("0", "root")


@pytest.mark.docker
@pytest.mark.slow
def test_an_image_deleted_locally_is_pulled_back_by_digest(published, docker_client):
    from lab.envs.docker import DockerEnv

    harness, record, _ = published
    docker_client.api.remove_image(record["image"], force=True, noprune=True)
    with pytest.raises(Exception):
        docker_client.images.get(record["image"])
    env = DockerEnv(harness, client=docker_client)  # the image comes from image.lock.json
    env.preflight()  # pulls it
    assert env.reference() == record["image"]
    assert docker_client.images.get(record["image"]).id


@pytest.mark.docker
@pytest.mark.slow
def test_a_push_error_in_the_stream_raises(published, docker_client, tmp_path):
    from lab.publish import publish

    harness = load(locked_copy(tmp_path / "cdot"))
    # Nothing listens on this port: the engine reports the failure inside the push stream.
    with pytest.raises(LabError, match=r"push of 127\.0\.0\.1:5999/lab/cdot:.* failed"):
        publish(harness, "127.0.0.1:5999", base_image=BASE, client=docker_client)
    assert not (harness.root / "image.lock.json").exists()


@pytest.mark.docker
@pytest.mark.slow
def test_a_base_image_that_is_not_there_is_named(docker_client, tmp_path):
    from lab.publish import publish

    harness = load(locked_copy(tmp_path / "cdot"))
    with pytest.raises(LabError, match="local/absent:none is not on this engine"):
        publish(harness, REGISTRY, base_image="local/absent:none", client=docker_client)


# --- without an engine ------------------------------------------------------------------------
def test_resolve_image_reads_the_image_lock(tmp_path):
    from lab.publish import resolve_image

    harness = load(locked_copy(tmp_path / "cdot"))
    assert resolve_image(harness) is None
    path = harness.root / "image.lock.json"
    ref = "127.0.0.1:5000/lab/cdot@sha256:" + "a" * 64
    path.write_text(json.dumps({"image": ref}))
    assert resolve_image(harness) == ref
    path.write_text(json.dumps({"image": "127.0.0.1:5000/lab/cdot:latest"}))
    with pytest.raises(LabError, match="not pinned by digest"):
        resolve_image(harness)
    path.write_text("{not json")
    with pytest.raises(LabError, match="is not an image lock"):
        resolve_image(harness)


def _lock_entries(path: Path) -> dict:
    """name -> (version, [hashes]) of a pip lock file with --hash lines."""
    entries, current = {}, None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", line)
        if m:
            current = m[1].lower()
            entries[current] = (m[2], [])
        for h in re.findall(r"--hash=sha256:([0-9a-f]+)", line):
            assert current, f"{path.name}: a hash before any requirement"
            assert len(h) == 64, f"{path.name}: {current} has a malformed hash"
            entries[current][1].append(h)
    return entries


@pytest.mark.parametrize("kind, top_level", [
    ("cpu", ["click", "numpy", "rich", "setuptools"]),
    ("cuda", ["click", "numpy", "rich", "setuptools", "torch", "nvidia-ml-py"]),
])
def test_lock_files_pin_every_requirement_with_hashes(kind, top_level):
    path = REPO / "requirements" / f"{kind}.txt"
    entries = _lock_entries(path)
    for name in top_level:
        assert name in entries, f"{path.name} lacks {name}"
    for name, (version, hashes) in entries.items():
        assert re.match(r"^\d[\w.+!-]*$", version), (name, version)
        assert hashes, f"{path.name}: {name}=={version} has no --hash"
    # publish reads the target of the wheels from the header
    header = path.read_text()
    assert re.search(r"CPython \d+\.\d+", header) and re.search(r"glibc 2\.\d+", header)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_pin_their_base_and_suit_the_classic_builder(name):
    text = (REPO / name).read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and re.search(r"@sha256:[0-9a-f]{64}$", base[1]), "the default base is pinned by digest"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    digest = re.search(r"^ARG BASE_DIGEST=(\S+)$", text, re.M)
    assert digest and base[1].endswith(digest[1]), "BASE_DIGEST's default is the default base's digest"
    assert re.search(r"^ARG SOURCE_DATE_EPOCH=\d+$", text, re.M)
    for label in ("org.opencontainers.image.version", "org.lab.harness-lock",
                  "org.opencontainers.image.base.digest"):
        assert label in text
    assert "--require-hashes" in text and f"requirements/{name.split('.')[1]}.txt" in text
    assert "pip install --no-deps" in text  # the lab itself
    # The engine here is Docker 20.10's classic builder: no BuildKit-only syntax.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "--mount" not in code and "<<" not in code
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
