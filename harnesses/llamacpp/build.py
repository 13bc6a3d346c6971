"""Build llama.cpp's tools from the pinned tree plus a candidate's editable files.

One working tree and one CMake/Ninja build folder per backend live in the cache. A build
overlays the staged editable files onto the pristine files there (only files whose bytes differ
are rewritten, files the candidate removed are removed), runs Ninja, and copies the static
binaries out. Ninja then recompiles only what changed, and ccache answers a switch back to a
source it has seen (incumbent, candidate, incumbent...) in seconds. Every file outside the
editable surface comes from the pinned tree's git objects, so a candidate cannot bring its own.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lab.sdk import Build, EnvironmentUnavailable, file_lock, progress, sandbox, sha256_file, tree_hash

from . import source

TOOLS = ("lab-llama-driver", "llama-bench", "llama-perplexity", "llama-results")  # what the oracle and timing run
CUDA_TOOLS = ("test-backend-ops",)  # compares the CUDA ops with the CPU's
BUILD_TIMEOUT_S = 3600
# The harness's own driver (driver.cpp, locked): built as one more tool of the tree, linked
# against the same libllama/ggml as every other tool of the build.
DRIVER_SOURCE = Path(__file__).resolve().with_name("driver.cpp")
DRIVER_DIR = "tools/lab-driver"
DRIVER_CMAKE = ("add_executable(lab-llama-driver driver.cpp)\n"
                "target_link_libraries(lab-llama-driver PRIVATE llama ${CMAKE_THREAD_LIBS_INIT})\n"
                "target_compile_features(lab-llama-driver PRIVATE cxx_std_17)\n")
ERROR_LINES = 60


@dataclass(frozen=True)
class Flavor:
    """What the harness builds for: the CPU backend, or CUDA for one compute capability."""

    backend: str  # "cpu" or "cuda"
    cuda_arch: str = ""  # "90" for an H100

    @property
    def key(self) -> str:
        return f"{source.COMMIT}-{self.backend}{self.cuda_arch}"

    @property
    def tools(self) -> tuple[str, ...]:
        return TOOLS + (CUDA_TOOLS if self.backend == "cuda" else ())

    def cmake_args(self) -> list[str]:
        args = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=ON",
                "-DLLAMA_BUILD_EXAMPLES=OFF", f"-DLLAMA_BUILD_COMMIT={source.COMMIT}", "-DLLAMA_BUILD_NUMBER=0",
                "-DGGML_CCACHE=ON"]
        if self.backend == "cuda":
            args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_arch}", "-DGGML_NATIVE=OFF"]
        else:
            # The timing machine's own ISA (AVX-512 where it has it), but no AMX: ggml's AMX
            # matmuls (compiled in when -march=native defines __AMX_INT8__) died with SIGILL on
            # `tilezero` on a Xeon VM that advertises AMX and grants its permission (2026-12-01),
            # and they would time another decode path than every machine without AMX. Undefining
            # the macros (after GCC predefines them) compiles that code out.
            no_amx = " ".join(f"-U__{m}__" for m in ("AMX_TILE", "AMX_INT8", "AMX_BF16"))
            args += ["-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
        return args


def cuda_arch() -> str:
    """The compute capability of GPU 0 as CMake wants it ('90'), from nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    if not re.fullmatch(r"\d+\.\d+", out):
        raise EnvironmentUnavailable("the CUDA backend needs an NVIDIA GPU visible to nvidia-smi; "
                                     "set LAB_LLAMACPP_BACKEND=cpu to build for the CPU")
    return out.replace(".", "")


def missing_tools(flavor: Flavor) -> list[str]:
    """Tools without which nothing builds. ccache is not among them: without it a build is still
    right, only a switch back to a source seen before recompiles (the GPU machine's image has none)."""
    need = ["cmake", "ninja", "git", "c++", "cc"] + (["nvcc"] if flavor.backend == "cuda" else [])
    return [t for t in need if shutil.which(t) is None]


def ccache_env(workdir: Path, home: Path) -> dict:
    """ccache keyed on paths relative to the working folder, so a cache made under another
    $LAB_CACHE (a CI job, a test session) still hits; $CCACHE_DIR wins when the user set one."""
    return {"CCACHE_DIR": os.environ.get("CCACHE_DIR") or str(home / "ccache"),
            "CCACHE_BASEDIR": str(workdir), "CCACHE_NOHASHDIR": "1", "CCACHE_MAXSIZE": "5G"}


def _editable_in(tree: Path, is_editable, roots: tuple[str, ...]) -> set[str]:
    found = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(tree / root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                rel = Path(dirpath, name).relative_to(tree).as_posix()
                if is_editable(rel):
                    found.add(rel)
    return found


def overlay(src: Path, staged: Path, is_editable, roots: tuple[str, ...]) -> list[str]:
    """Make the editable files of `src` exactly those of `staged` (a file the candidate does not
    have is removed); return the paths rewritten. Only this function writes into `src`."""
    want = _editable_in(staged, is_editable, roots)
    have = _editable_in(src, is_editable, roots)
    changed = []
    for rel in sorted(have - want):
        (src / rel).unlink()
        changed.append(rel)
    for rel in sorted(want):
        data = (staged / rel).read_bytes()
        target = src / rel
        if target.exists() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".lab-tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        changed.append(rel)
    return changed


def _locked_manifest(src: Path, is_editable) -> str:
    """The sha256 (a symlink: its target) of every file of the cached working tree outside the
    surface: the cached tree is reused only while these match, re-hashed at every build (a size
    and a modification time can be kept while the bytes change)."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(src).as_posix()
            if not is_editable(rel):
                entries.append(f"{rel} -> {os.readlink(path)}" if path.is_symlink() else f"{rel} {sha256_file(path)}")
    return "\n".join(entries) + "\n"


def changed_from_pristine(repo: Path, staged: Path, is_editable, roots: tuple[str, ...]) -> list[str]:
    """The editable files in which `staged` differs from the pinned tree (edited, added, removed)."""
    pristine = {p: b for p, b in source.pristine_blobs(repo, roots).items() if is_editable(p)}
    have = _editable_in(staged, is_editable, roots)
    edited = [rel for rel in sorted(have) if pristine.get(rel) != source.blob_hash(staged / rel)]
    return edited + sorted(set(pristine) - have)


def install_driver(src: Path, repo: Path) -> bool:
    """Put the harness's driver into the working tree as tools/lab-driver (files outside the
    editable surface, written by the harness only); True when a file changed."""
    tools_cmake = source.pristine_file(repo, "tools/CMakeLists.txt") + b"\nadd_subdirectory(lab-driver)\n"
    wanted = {f"{DRIVER_DIR}/driver.cpp": DRIVER_SOURCE.read_bytes(),
              f"{DRIVER_DIR}/CMakeLists.txt": DRIVER_CMAKE.encode(),
              "tools/CMakeLists.txt": tools_cmake}
    changed = False
    for rel, data in wanted.items():
        target = src / rel
        if target.exists() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        changed = True
    return changed


def _build_box(src: Path, bld: Path, cache_dir: Path, env: dict, gpu: bool) -> sandbox.Sandbox:
    """CMake, Ninja and the compilers run the candidate's build files (ggml-cpu/CMakeLists.txt
    is editable): sandboxed, the tree read-only, only the build folder and ccache writable."""
    bld.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    binds = [sandbox.Bind(src), sandbox.Bind(bld, writable=True), sandbox.Bind(cache_dir, writable=True)]
    keep = {k: v for k, v in env.items() if k.startswith("CCACHE_") or k in ("PATH", "CUDA_HOME", "CUDACXX")}
    return sandbox.Sandbox(binds=binds, gpu=False, env=keep, cwd=str(bld))


def _run_sandboxed(box: sandbox.Sandbox, cmd: list[str], gpu: bool) -> subprocess.CompletedProcess:
    result = box.run(cmd, sandbox.Limits(seconds=BUILD_TIMEOUT_S, memory_bytes=None if gpu else 32 << 30,
                                         output_bytes=8 << 20))
    if result.timed_out:
        raise subprocess.TimeoutExpired(cmd, BUILD_TIMEOUT_S)
    return subprocess.CompletedProcess(cmd, result.returncode, result.stdout, result.stderr)


def _sanitize(text: str, workdir: Path) -> str:
    return text.replace(str(workdir / "src") + "/", "").replace(str(workdir), "<build>")


def _errors(log: str) -> str:
    """The compiler's error lines (with a little context), else the log's tail."""
    lines = log.splitlines()
    keep = [i for i, line in enumerate(lines) if re.search(r"\berror\b|FAILED:|undefined reference", line)]
    if not keep:
        return "\n".join(lines[-ERROR_LINES:])
    picked = sorted({j for i in keep for j in range(i, min(i + 3, len(lines)))})
    return "\n".join(lines[j] for j in picked[:ERROR_LINES])


def build(staged: Path, out: Path, *, home: Path, flavor: Flavor, is_editable, roots: tuple[str, ...],
          jobs: int | None = None) -> Build:
    """Build the tools for `staged` (the candidate's editable files) into `out/bin`."""
    repo = source.prepare_tree(home)
    workdir = _workdir(home, flavor)
    src, bld = workdir / "src", workdir / "build"
    started = time.monotonic()
    with file_lock(workdir / ".lock"):
        _refresh_tree(repo, src, bld, workdir / "locked-files.json", is_editable)
        changed = overlay(src, staged, is_editable, roots)
        edited = changed_from_pristine(repo, staged, is_editable, roots)
        env = {**os.environ, **ccache_env(workdir, home)}
        box = _build_box(src, bld, Path(env["CCACHE_DIR"]), env, flavor.backend == "cuda")
        log_parts = []
        configured = _configure(box, src, bld, flavor)
        if configured is not None:
            log_parts.append(configured.stdout + configured.stderr)
            if configured.returncode != 0:
                text = _sanitize("\n".join(log_parts), workdir)
                return Build(ok=False, source_hash="", error="cmake configure failed:\n" + _errors(text),
                             report=text[-4000:], seconds=time.monotonic() - started)
        try:
            proc = _compile(box, bld, flavor, jobs, len(changed))
        except subprocess.TimeoutExpired:
            return Build(ok=False, source_hash="", error=f"the build ran past {BUILD_TIMEOUT_S} s",
                         seconds=time.monotonic() - started)
        log_parts.append(proc.stdout + proc.stderr)
        text = _sanitize("\n".join(log_parts), workdir)
        if proc.returncode != 0:
            return Build(ok=False, source_hash="", error=_errors(text), report=text[-4000:],
                         seconds=time.monotonic() - started)
        bindir = out / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        for tool in flavor.tools:
            shutil.copy2(bld / "bin" / tool, bindir / tool)
    return _built(bindir, text, home=home, flavor=flavor, edited=edited, rewritten=len(changed), started=started)


def _workdir(home: Path, flavor: Flavor) -> Path:
    """The cache's working folder (tree and build) of this flavor. CMake records absolute paths: a
    cache mounted elsewhere (a container's /cache) gets its own build folder, and ccache, keyed on
    relative paths, still shares the objects."""
    return home / "build" / f"{flavor.key}-{hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]}"


def _refresh_tree(repo: Path, src: Path, bld: Path, marker: Path, is_editable) -> None:
    """Keep the cached working tree `src` only while its files outside the surface match the
    manifest in `marker`; else export the pinned tree again (and drop the build folder). Either
    way the harness's driver is installed in it."""
    if not (marker.exists() and marker.read_text() == _locked_manifest(src, is_editable)):
        # First use, or a file outside the surface changed since (a candidate's CMake or code
        # can write anywhere it can reach): start again from the pinned tree.
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(bld, ignore_errors=True)
        progress.stage(f"llama.cpp: exporting the pinned tree {source.COMMIT} into the build cache")
        source.export_pristine(repo, src)
        install_driver(src, repo)
        marker.write_text(_locked_manifest(src, is_editable))
    elif install_driver(src, repo):  # the harness's driver changed (a new lock)
        marker.write_text(_locked_manifest(src, is_editable))


def _configure(box: sandbox.Sandbox, src: Path, bld: Path, flavor: Flavor) -> subprocess.CompletedProcess | None:
    """CMake's configure step, run only when the build folder has none yet (else None)."""
    if (bld / "build.ninja").exists():
        return None
    progress.stage(f"llama.cpp: configuring ({flavor.backend} backend, cmake)")
    return _run_sandboxed(box, ["cmake", "-S", str(src), "-B", str(bld), *flavor.cmake_args()],
                          flavor.backend == "cuda")


def _compile(box: sandbox.Sandbox, bld: Path, flavor: Flavor, jobs: int | None,
             rewritten: int) -> subprocess.CompletedProcess:
    """Ninja (through cmake --build) on the flavor's tools; TimeoutExpired past BUILD_TIMEOUT_S."""
    cmd = ["cmake", "--build", str(bld), "-j", str(jobs or os.cpu_count() or 2), "--target", *flavor.tools]
    cold = not (bld / "bin" / flavor.tools[0]).exists()
    progress.stage(f"llama.cpp: compiling the whole tree and linking {len(flavor.tools)} tools (a cold build: "
                   "~10 min on 2 cores, a minute or two once ccache has the objects)" if cold else
                   f"llama.cpp: recompiling {rewritten} changed file(s), linking {len(flavor.tools)} tools")
    return _run_sandboxed(box, cmd, flavor.backend == "cuda")


def _built(bindir: Path, text: str, *, home: Path, flavor: Flavor, edited: list[str], rewritten: int,
           started: float) -> Build:
    """The record of a build that succeeded: its tools' hashes, what was compiled, its warnings."""
    compiled = len(re.findall(r"Building (?:C|CXX|CUDA) object", text))
    progress.stage(f"llama.cpp: built in {time.monotonic() - started:.0f} s ({compiled} objects compiled)")
    info = {"backend": flavor.backend, "cuda_arch": flavor.cuda_arch, "llama_cpp_commit": source.COMMIT,
            "tree_hash": source.TREE_HASH, "cmake_args": " ".join(flavor.cmake_args()),
            "changed_files": edited, "files_rewritten": rewritten, "objects_compiled": compiled,
            "ccache": shutil.which("ccache") is not None, "source_origin": source.origin(home),
            "tools": {t: sha256_file(bindir / t) for t in flavor.tools}}
    return Build(ok=True, source_hash="", artifact=str(bindir), artifact_sha256=tree_hash(bindir, list(flavor.tools)),
                 report="\n".join(line for line in text.splitlines() if "warning" in line)[-4000:],
                 seconds=time.monotonic() - started, info=info)
