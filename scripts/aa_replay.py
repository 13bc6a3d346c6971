"""Write a replay file of A/A and known-slowdown proposals for a harness (for `--agent replay:`).

An A/A proposal adds one comment line to the end of an editable file: a new source (the
duplicate check lets it through), the same program. A slowdown proposal applies a patch that
adds measured work (e.g. wavegru's solutions/measure/slower_3pct.patch) plus such a comment,
so each one is distinct too. Run through `lab run`, every verdict is then known in advance:
A/A must never be KEEP (or WORSE) and the slowdown must be WORSE. That is how the scaling runs
of docs/scaling.md count experiments per hour and false decisions at the same time.

    python3 scripts/aa_replay.py harnesses/wavegru --aa 15 \
        --slower harnesses/wavegru/solutions/measure/slower_3pct.patch --slow 5 -o /tmp/replay.jsonl
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.harness import load  # noqa: E402


def comment_for(path: str, text: str) -> str:
    prefix = "#" if path.endswith((".py", ".sh", ".cmake", ".txt")) else "//"
    return f"{prefix} {text}\n"


def diff(path: str, before: str, after: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        f"a/{path}", f"b/{path}"))


def patched(root: Path, patch: Path, path: str) -> str:
    """`path`'s text after `patch` is applied to a copy of the harness's editable file."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / path, target)
        subprocess.run(["git", "apply", "--unidiff-zero", str(patch.resolve())], cwd=tmp, check=True)
        return target.read_text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("harness")
    ap.add_argument("--aa", type=int, default=10, help="A/A proposals")
    ap.add_argument("--slower", type=Path, help="a patch that adds measured work")
    ap.add_argument("--slow", type=int, default=0, help="slowdown proposals (need --slower)")
    ap.add_argument("--seed", type=int, default=0, help="order of the two kinds, shuffled with this seed")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    if args.slow and not args.slower:
        ap.error("--slow needs --slower PATCH")
    h = load(args.harness)
    tree = h.source_tree()
    path = sorted(h.editable_files(tree))[0]
    original = (tree / path).read_text()
    slow_text = patched(tree, args.slower, path) if args.slow else ""
    kinds = ["aa"] * args.aa + ["slow"] * args.slow
    random.Random(args.seed).shuffle(kinds)
    items = []
    for i, kind in enumerate(kinds, 1):
        if kind == "aa":
            after = original + comment_for(path, f"A/A proposal {i}: the same program")
            hypothesis = f"A/A {i}: a comment only (expect SAME)"
        else:
            after = slow_text + comment_for(path, f"slowdown proposal {i}")
            hypothesis = f"slowdown {i}: {args.slower.name} (expect WORSE)"
        items.append({"patch": diff(path, original, after), "hypothesis": hypothesis})
    args.out.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"{args.out}: {args.aa} A/A and {args.slow} slowdown proposals on {path}")


if __name__ == "__main__":
    main()
