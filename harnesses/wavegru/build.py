"""The sealed build: nvcc sees kernel.cu and wavegru.h, nothing else of the lab.

Both files are copied into a fresh private folder that holds nothing else (no seeds, no run
folder, no repository above it), bound into a bubblewrap sandbox (lab/sandbox.py) at the fixed
path /stage, its only writable place; nvcc runs there with the harness's flags. Two passes:

1. `nvcc -M` (the dependency list of the device compilation, __CUDA_ARCH__ defined): every file
   the preprocessor opened must be /stage/kernel.cu, /stage/wavegru.h, a CUDA toolkit header or
   a C/C++ standard header (/usr/include, gcc's own include folder). Anything else fails the
   build with a one-line reason that names the path and quotes nothing of any file.
2. The compile. Its output is shown only after pass 1 accepted every include.

A build past the time limit ends with its whole process tree (the sandbox's PID namespace, or
its process group when the sandbox is off). The fixed /stage path also makes the cubin
bit-identical whatever folder the lab runs in (-lineinfo records the compilation folder, and
the files' modification times, which the stage sets to one fixed value); with
`LAB_SANDBOX=off` a fixed host folder, taken under a lock, stands in for it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab.sdk import file_lock, sandbox

STAGE_INSIDE = "/stage"
SOURCES = ("kernel.cu", "wavegru.h")
FIXED_MTIME = 946684800  # 2000-01-01: the staged files' time, so that it cannot reach the cubin  # the only files a build sees besides the toolchain
# Where the C and C++ standard headers live (the host compiler's own include folder included).
SYSTEM_HEADER_ROOTS = ("/usr/include", "/usr/lib/gcc", "/usr/local/include")


@dataclass
class Outcome:
    ok: bool
    cubin: bytes = b""
    report: str = ""  # nvcc's output (the ptxas -v report), shown only when the includes passed
    error: str = ""  # one line when the seal refused the source; nvcc's output for a compile error
    seconds: float = 0.0
    timed_out: bool = False


def toolkit_root(nvcc: str) -> Path:
    """The CUDA toolkit that owns this nvcc (through any wrapper script or symlink)."""
    real = Path(os.path.realpath(nvcc))
    text = real.read_bytes()[:4096] if real.stat().st_size < 4096 else b""
    m = re.search(rb"exec\s+(\S+/bin/nvcc)\b", text)  # a one-line wrapper (/usr/local/bin/nvcc)
    if m:
        real = Path(os.path.realpath(m.group(1).decode()))
    return real.parent.parent


def allowed_roots(toolkit: Path) -> list[str]:
    tk = os.path.realpath(toolkit)
    return [tk + "/include", tk + "/targets", tk + "/nvvm/include"] + [os.path.realpath(r) for r in SYSTEM_HEADER_ROOTS]


def parse_deps(text: str) -> list[str]:
    """The prerequisites of the make rule `nvcc -M` prints (escaped spaces kept)."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if ":" not in line:
            continue
        target, _, rest = line.partition(": ")
        if not rest and line.rstrip().endswith(":"):
            continue
        for tok in re.split(r"(?<!\\)\s+", rest.strip()):
            if tok:
                out.append(tok.replace("\\ ", " "))
    return out


def include_problem(deps: list[str], stage_inside: str, toolkit: Path) -> str | None:
    """None when every dependency is one of ours or a toolkit/standard header; else one line
    that names the first offending path (never anything read from a file)."""
    roots = allowed_roots(toolkit)
    ours = {os.path.normpath(os.path.join(stage_inside, s)) for s in SOURCES}
    for dep in deps:
        path = os.path.normpath(dep if os.path.isabs(dep) else os.path.join(stage_inside, dep))
        if path in ours:
            continue
        if path == stage_inside or path.startswith(stage_inside.rstrip("/") + "/"):
            return (f"kernel.cu includes {_shown(path, stage_inside)}: the build sees only kernel.cu and "
                    "wavegru.h (include nothing but wavegru.h, CUDA toolkit and C++ standard headers)")
        real = os.path.realpath(path)
        if any(real == r or real.startswith(r + "/") for r in roots):
            continue
        return (f"kernel.cu includes {path}, which is neither wavegru.h nor a CUDA toolkit or C++ "
                "standard header: the build refuses it")
    return None


def _shown(path: str, stage_inside: str) -> str:
    return path.replace(stage_inside.rstrip("/") + "/", "", 1)


def own_lines(output: str, stage_inside: str) -> str:
    """Of a failed preprocessing pass, only the diagnostics located in kernel.cu or wavegru.h
    (paths shortened): a line of any other file may quote that file."""
    keep = []
    prefixes = tuple(f"{stage_inside.rstrip('/')}/{s}" for s in SOURCES) + SOURCES
    for line in output.splitlines():
        if line.startswith(prefixes):
            keep.append(line.replace(stage_inside.rstrip("/") + "/", ""))
    return "\n".join(keep[:20])


@contextmanager
def private_stage():
    """Fresh folders for one build: (stage host path, the path nvcc sees, scratch host path).
    Under bubblewrap a new temporary folder seen as /stage, and nvcc's scratch (its /tmp) apart
    from it; with the sandbox off a fixed folder of this user under a lock, emptied first, so
    that the cubin does not depend on where the lab runs."""
    if sandbox.mode() == "off":
        base = Path(f"/tmp/lab-wavegru-build-{os.getuid()}")
        base.mkdir(mode=0o700, exist_ok=True)
        with file_lock(base / ".lock"):
            for sub in ("stage", "scratch"):
                shutil.rmtree(base / sub, ignore_errors=True)
                (base / sub).mkdir()
            try:
                yield base / "stage", str(base / "stage"), base / "scratch"
            finally:
                for sub in ("stage", "scratch"):
                    shutil.rmtree(base / sub, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="wavegru-build-") as tmp:
        (Path(tmp) / "stage").mkdir()
        (Path(tmp) / "scratch").mkdir()
        yield Path(tmp) / "stage", STAGE_INSIDE, Path(tmp) / "scratch"


def sealed_nvcc(nvcc: str, flags: list[str], dep_flags: list[str], kernel: bytes, header: bytes,
                limit_s: float) -> Outcome:
    """Pass 1 (includes) and pass 2 (compile) in one sandbox description, within limit_s in all."""
    start = time.monotonic()
    toolkit = toolkit_root(nvcc)
    with private_stage() as (stage, inside, scratch):
        (stage / "kernel.cu").write_bytes(kernel)
        (stage / "wavegru.h").write_bytes(header)
        for name in SOURCES:  # -lineinfo records each file's mtime too: one fixed time for all
            os.utime(stage / name, (FIXED_MTIME, FIXED_MTIME))
        off = inside == str(stage)
        binds = [sandbox.Bind(stage, inside=None if off else inside, writable=True),
                 sandbox.Bind(scratch, inside=None if off else "/tmp", writable=True)]  # nvcc's temporaries
        if not any(str(toolkit).startswith(f + "/") for f in sandbox.SYSTEM_READABLE):
            binds.append(sandbox.Bind(toolkit))  # a toolkit outside the system folders, read-only
        tmp = str(scratch) if off else "/tmp"
        box = sandbox.Sandbox(binds=binds, python=False, cwd=inside, env={"HOME": tmp, "TMPDIR": tmp})
        src = f"{inside}/kernel.cu"

        def run(argv):
            left = limit_s - (time.monotonic() - start)
            if left <= 0:
                return None
            return box.run(argv, sandbox.Limits(seconds=left, memory_bytes=None, output_bytes=1 << 20))

        def past_limit():
            return Outcome(False, error=f"nvcc ran past the {limit_s:.0f} s build limit; its whole process "
                                        "tree was ended", seconds=time.monotonic() - start, timed_out=True)

        deps = run([nvcc, *dep_flags, "-M", src])
        if deps is None or deps.timed_out:
            return past_limit()
        if deps.returncode != 0:
            lines = own_lines(deps.stdout + deps.stderr, inside)
            return Outcome(False, error="preprocessing failed" + (":\n" + lines if lines else
                           " in a file other than kernel.cu (its messages are withheld: they may quote it)"),
                           seconds=time.monotonic() - start)
        problem = include_problem(parse_deps(deps.stdout), inside, toolkit)
        if problem:
            return Outcome(False, error=problem, report=problem, seconds=time.monotonic() - start)
        comp = run([nvcc, *flags, "-o", f"{inside}/kernel.cubin", src])
        if comp is None or comp.timed_out:
            return past_limit()
        report = (comp.stdout + comp.stderr).replace(inside.rstrip("/") + "/", "")
        cubin = stage / "kernel.cubin"
        if comp.returncode != 0 or not cubin.is_file():
            return Outcome(False, report=report, error=report[-4000:] or "nvcc failed",
                           seconds=time.monotonic() - start)
        return Outcome(True, cubin=cubin.read_bytes(), report=report, seconds=time.monotonic() - start)
