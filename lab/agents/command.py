"""An external coding agent CLI as the proposal source (`--agent 'command:claude -p'`).

For each proposal the lab stages a scratch folder laid out like the harness tree, holding only
the editable files of the current best plus `program.md`, and runs CMD there through the shell:

- the PROMPT (the run's brief and the rules) replaces `{prompt}` in CMD, shell-quoted, when CMD
  contains `{prompt}` (e.g. `codex exec {prompt}`); otherwise it is written to the command's
  standard input (e.g. `claude -p`). It is also left in the folder as PROMPT.md;
- the command may edit the editable files only (other files it writes are ignored) and may
  write a one-line hypothesis to the file `HYPOTHESIS`; without it, the first line of its
  standard output is taken (200 characters at most);
- it runs in its own process group, killed whole when it exceeds the timeout, and whatever it
  left running is killed when it exits. Its output goes to run_dir/agent/command-NNNN.{stdout,stderr}.

The proposal is the diff from the current best to the folder (the same diff as the LLM agent's).
A non-zero exit, a timeout or no change is a failed proposal, never a stopped run.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from ..errors import LabError
from .base import Agent, AgentContext, Proposal
from .tools import (Transcript, changed_outside, diff_trees, episode_path, hypothesis_line,
                    run_brief, stage_scratch)

HYPOTHESIS_FILE = "HYPOTHESIS"
PROMPT_FILE = "PROMPT.md"
LAB_FILES = (HYPOTHESIS_FILE, PROMPT_FILE, "program.md")  # what the lab puts there, not a proposal
KILL_GRACE_S = 5.0
TAIL_CHARS = 2000

PROMPT_RULES = """\
You are the proposal agent of a benchmark lab that hill-climbs the performance of this harness.
The current directory is a scratch copy of its editable files (laid out like the harness
folder) plus program.md, the harness's operating notes: read them first.

Make ONE change that should make it faster, to the editable files only ({editable}); other files
you write are ignored. Do not try to run the benchmark: the lab builds your change with its own
flags, checks it against a locked oracle on secret inputs, times it against the current best and
keeps it only if it is correct and measurably faster. Never special-case inputs or skip work.

When you are done, write ONE line to the file HYPOTHESIS: what should get faster and why. Then exit.
"""


class CommandAgent(Agent):
    name = "command"

    def __init__(self, command: str, timeout_s: float = 1800.0):
        if not command.strip():
            raise LabError("command:CMD needs a command, e.g. --agent 'command:claude -p'")
        self.command = command
        self.timeout_s = timeout_s

    def prompt(self, ctx: AgentContext) -> str:
        return PROMPT_RULES.format(editable=", ".join(ctx.editable)) + "\n" + run_brief(ctx, source=False)

    def propose(self, ctx: AgentContext) -> Proposal:
        work = stage_scratch(ctx)
        (work / "program.md").write_text(ctx.program_md)
        prompt = self.prompt(ctx)
        (work / PROMPT_FILE).write_text(prompt)
        secret = os.environ.get("ANTHROPIC_API_KEY", "").strip()  # the CLI's own; never in our files
        transcript = Transcript(episode_path(ctx.run_dir, "command"), secret=secret)
        stdout_path = transcript.path.with_suffix(".stdout")
        stderr_path = transcript.path.with_suffix(".stderr")
        if "{prompt}" in self.command:
            cmd, stdin = self.command.replace("{prompt}", shlex.quote(prompt)), None
        else:
            cmd, stdin = self.command, work / PROMPT_FILE
        transcript.write({"type": "command", "command": self.command, "cwd": str(work),
                          "prompt_via": "argument" if stdin is None else "stdin", "prompt": prompt,
                          "timeout_s": self.timeout_s})
        returncode, seconds, timed_out = _run_group(cmd, work, stdin, stdout_path, stderr_path, self.timeout_s)
        stdout, stderr = _read(stdout_path, secret), _read(stderr_path, secret)
        transcript.write({"type": "exit", "returncode": returncode, "timed_out": timed_out,
                          "seconds": round(seconds, 3), "stdout_tail": stdout[-TAIL_CHARS:],
                          "stderr_tail": stderr[-TAIL_CHARS:]})
        failure, patch, hypothesis = "", "", ""
        if timed_out:
            failure = f"command timed out after {self.timeout_s:g} s (its process group was killed)"
        elif returncode != 0:
            tail = " ".join(stderr.strip().splitlines()[-3:])[-300:] or "no error output"
            failure = f"command exited with status {returncode}: {tail}"
        else:
            patch = diff_trees(Path(ctx.incumbent_tree), work, ctx.editable, exclude=LAB_FILES)
            if not patch:
                outside = changed_outside(work, ctx.editable, exclude=LAB_FILES)
                failure = "submitted no change" + (
                    f" (it wrote only files outside the editable surface: {', '.join(outside[:5])})" if outside else "")
            hyp_file = work / HYPOTHESIS_FILE
            hypothesis = hypothesis_line(hyp_file.read_text(errors="replace") if hyp_file.is_file() else "")
            hypothesis = hypothesis or hypothesis_line(stdout) or "(no hypothesis given)"
        transcript.write({"type": "end", "failure": failure, "hypothesis": hypothesis,
                          "patch_lines": patch.count("\n")})
        return Proposal(patch="" if failure else patch, hypothesis=hypothesis, failure=failure,
                        transcript=str(transcript.path))


def _run_group(cmd: str, cwd: Path, stdin_path: Path | None, stdout_path: Path, stderr_path: Path,
               timeout_s: float) -> tuple[int | None, float, bool]:
    """Run `cmd` through the shell in a new session (its standard input read from `stdin_path`,
    a file, so that a command that never reads it cannot block the lab); kill its whole process
    group on timeout, and whatever of it is left when it exits. Returns (returncode, seconds,
    timed_out)."""
    start = time.monotonic()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err, \
            open(stdin_path if stdin_path else os.devnull, "rb") as inp:
        proc = subprocess.Popen(cmd, shell=True, cwd=cwd, stdin=inp, stdout=out, stderr=err,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        finally:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, time.monotonic() - start, timed_out


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, secret: str) -> str:
    """The text of an output file, with `secret` scrubbed from it (and from the file)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    if secret and secret in text:
        text = text.replace(secret, "[redacted]")
        path.write_text(text)
    return text

