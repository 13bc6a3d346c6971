"""The numbers of BENCH.md, measured in one process on the GPU machine:

    python3 scripts/wavegru/bench.py --json bench.json [--pairs 20]

PyTorch eager and CUDA-graph references at B=1, then, for the baseline kernel and every
solutions/correct patch, one full evaluation as the lab runs it (build incumbent and candidate,
the full oracle on fresh seeds, interleaved pairs in random order), timed end to end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "harnesses" / "wavegru"  # the harness this measures
sys.path.insert(0, str(REPO))

from lab.harness import load  # noqa: E402


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as exc:  # a missing tool is a blank in the fingerprint, not a failure
        return f"unavailable: {exc}"


def patched_source(patch: Path | None) -> bytes:
    src = (HERE / "kernel.cu").read_bytes()
    if patch is None:
        return src
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.cu").write_bytes(src)
        subprocess.run(["git", "apply", str(patch)], cwd=tmp, check=True)
        return (Path(tmp) / "kernel.cu").read_bytes()


def build(h, source: bytes, tmp: Path, tag: str):
    src = tmp / f"src_{tag}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "kernel.cu").write_bytes(source)
    b = h.build(src, tmp / f"out_{tag}")
    if not b.ok:
        raise SystemExit(f"build of {tag} failed:\n{b.error}")
    return b


def evaluation(h, incumbent: bytes, candidate: bytes, pairs: int) -> dict:
    """One evaluation as the lab's runner does it; wall-clock timed from the first build."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        a = build(h, incumbent, Path(tmp), "A")
        b = build(h, candidate, Path(tmp), "B")
        t_build = time.perf_counter() - t0
        chk = h.check(b, [secrets.randbits(63) for _ in range(2)])
        la, lb = h.load(a), h.load(b)
        warm = secrets.randbits(63)  # warm-up, discarded (both sides on one seed: a settled pair)
        h.sample(la, warm)
        h.sample(lb, warm)
        rows = []
        for i in range(pairs):
            order = random.choice(("AB", "BA"))
            seed = secrets.randbits(63)
            res = {}
            for who in order:
                res[who] = h.sample(la if who == "A" else lb, seed)
            rows.append({"order": order, "A": res["A"].to_dict(), "B": res["B"].to_dict()})
        h.unload(la)
        h.unload(lb)
    total = time.perf_counter() - t0
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    sa = [r["A"]["seconds"] for r in rows]
    sb = [r["B"]["seconds"] for r in rows]
    steps = rows[0]["A"]["work"]["steps"]
    return {"check_passed": chk.passed, "check_lines": chk.lines, "check_seconds": chk.seconds,
            "build_seconds": t_build, "evaluation_seconds": total,
            "all_samples_ok": all(r["A"]["ok"] and r["B"]["ok"] for r in rows),
            "incumbent_sps": steps / med(sa), "candidate_sps": steps / med(sb),
            "incumbent_us_per_step": med(sa) / steps * 1e6, "candidate_us_per_step": med(sb) / steps * 1e6,
            "candidate_build_info": b.info, "adjudications_so_far": h.timed_pairs.adjudications, "pairs": rows}


def reference_timing(h) -> dict:
    import torch

    pkg = type(h).__module__.rsplit(".", 1)[0]
    mods = {m: sys.modules.get(f"{pkg}.{m}") or __import__(f"{pkg}.{m}", fromlist=["x"]) for m in
            ("model", "weights", "philox", "oracle")}
    W = mods["weights"].make_weights(mods["oracle"].PUBLIC_WEIGHT_SEED)
    ref = mods["model"].Reference(W, "cuda")
    out = {}
    for label, graph, T in (("torch_eager", False, 512), ("torch_cuda_graph_64", True, 4096)):
        G = mods["philox"].gumbel_torch(7, T, 1)
        ref.generate(G[:128], graph=graph)  # warm-up (and graph capture)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ref.generate(G, graph=graph)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out[label] = {"steps": T, "seconds": dt, "us_per_step": dt / T * 1e6, "sps": T / dt}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--pairs", type=int, default=20)
    a = ap.parse_args()
    h = load(HERE)
    import torch

    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python3 scripts/wavegru/bench.py --json bench_h100.json --pairs %d" % a.pairs,
              "device": torch.cuda.get_device_name(0),
              "nvidia_smi": sh(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,"
                                "temperature.gpu", "--format=csv,noheader"]),
              "nvcc": sh(["nvcc", "--version"]).splitlines()[-1:],
              "torch": torch.__version__, "python": platform.python_version(),
              "T": 16384, "B": 1}
    record["reference"] = reference_timing(h)
    print(json.dumps(record["reference"], indent=1), flush=True)
    base = patched_source(None)
    record["evaluations"] = {}
    variants = [("baseline", None)] + [(p.stem, p) for p in sorted((HERE / "solutions" / "correct").glob("*.patch"))]
    for name, patch in variants:
        ev = evaluation(h, base, patched_source(patch), a.pairs)
        record["evaluations"][name] = ev
        print(f"{name}: candidate {ev['candidate_sps']:.0f} sps ({ev['candidate_us_per_step']:.2f} us/step), "
              f"incumbent {ev['incumbent_sps']:.0f} sps; check {'pass' if ev['check_passed'] else 'FAIL'} "
              f"in {ev['check_seconds']:.1f} s; evaluation {ev['evaluation_seconds']:.1f} s; "
              f"samples ok {ev['all_samples_ok']}", flush=True)
        Path(a.json).write_text(json.dumps(record, indent=1))
    Path(a.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
