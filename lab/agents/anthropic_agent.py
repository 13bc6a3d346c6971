"""The LLM agent: a short tool-use episode on the Anthropic Messages API per proposal.

Each episode starts from the run's brief (program.md in the system prompt; the time and money
left, the current best source, the results, the run memory and the recent failures in the first
message). The model works on a scratch copy of the editable files with an editor that refuses
every other path (and every private one: known answers, evidence, records), may build its copy
(`compile`), run the oracle on it with public seeds plus a quick informative timing (`check`),
read a profile of the incumbent (`profile`) and open any past experiment (`history`), and ends
with `submit`: a one-line hypothesis, what it learned and its next idea. The proposal is the diff
from the incumbent to the scratch copy: the model never writes a result.

Nothing the model sends ends the run: every tool call is validated against its schema and runs
under a catch-all, so it returns a result or a tool error; a response cut at max_tokens is
discarded (its tool calls never run) and the model is asked to go on in smaller steps.

The API: every request streams (thinking models write long answers) with thinking and effort set
per phase. A busy API (529 overloaded, 429 rate limited, 5xx, connection errors, an error event
mid-stream) is waited out with jittered back-off that honours retry-after and the rate-limit
reset headers, up to `max_api_wait_s` (30 min) per outage; every wait is reported (events, live
view). An outage longer than that fails the proposal as `api_unavailable`, which the loop does not
count against the agent. What no retry can fix (a refused key, a forbidden or unknown model, a bad
request, an exhausted credit or spend limit) raises AgentFatal: the run stops at once and says
why. The API key reaches the SDK's client and nothing else: transcripts are scrubbed of it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import LabError
from ..extras import require
from ..harness import tree_files, tree_hash
from . import clock as _clock
from .base import Agent, AgentContext, AgentFatal, Proposal
from .memory import past_candidate
from .prices import DEFAULT_MODEL, cost_usd, load_prices, price_for
from .tools import (MAX_VIEW_CHARS, RUN_PREFIX, ToolError, Transcript, Workbench, diff_trees,
                    editable_files, episode_path, hypothesis_line, is_private, run_brief, stage_scratch,
                    DEFAULT_PRIVATE)

MAX_TOOL_RESULT_CHARS = 20_000
MAX_REFERENCE_CHARS = 100_000
MAX_NOTE_CHARS = 1_000  # learned / next_idea of a submit
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Phrases of the API's errors for an account that may not spend more (credit, spend limit).
SPEND_MARKERS = ("credit balance", "spend limit", "spending limit", "usage limits", "billing", "spend_limit")
# Phrases of a 400/413 that concern this one conversation (too long), not every request.
TOO_LONG_MARKERS = ("too long", "too large", "context window", "context length", "maximum context",
                    "prompt is too", "exceeds")
TRANSIENT_TYPES = ("overloaded_error", "rate_limit_error", "api_error", "timeout_error")

# The model settings, on purpose. Thinking models write long answers: max_tokens leaves room for
# thinking plus a whole-file edit, and every request streams (the API refuses long non-streaming
# requests). Thinking is adaptive (the model decides how much); effort is higher for research,
# done once or twice a run, than for the proposals, done a hundred times.
DEFAULT_MAX_TOKENS = 32_000
DEFAULT_THINKING = {"research": "adaptive", "propose": "adaptive"}
DEFAULT_EFFORT = {"research": "high", "propose": "medium"}
EFFORTS = ("low", "medium", "high", "xhigh", "max")
DEFAULT_MAX_EPISODE_USD = 5.0  # one proposal may not cost more (a runaway episode ends)
DEFAULT_MAX_API_WAIT_S = 1800.0  # one outage is waited out this long before the proposal is given up
MAX_TRUNCATIONS = 3  # responses cut at max_tokens in one episode before it is given up
MAX_DRAFT_CHECKS = 3  # check calls per episode (each costs an evaluation's time)
BACKOFF_FIRST_S, BACKOFF_CAP_S = 5.0, 120.0

SYSTEM_PROPOSE = """\
You are the proposal agent of a benchmark lab. The lab hill-climbs the performance of one \
harness: you propose ONE change to its editable files; the lab (not you) builds it, checks it \
against a locked oracle on secret inputs, times it against the current best in interleaved \
pairs, and keeps it only if it is correct and measurably faster. You never run the benchmark \
and never write a result.

How to work in this episode:
- Your editable files are a scratch copy of the current best source. Read them and the locked \
harness files with `editor` (command view); change the editable files with `editor` \
(str_replace, create, insert). Every other path is locked and refused. Prefer str_replace of a \
few lines over create of a whole file: your answer has an output limit.
- `compile` builds your scratch copy with the harness's own flags and returns the compiler's \
report or errors. `check` runs the oracle on your draft with public seeds and, unless you ask \
for none, a short informative timing against the current best; it costs the run time (a few \
per episode at most). A change that fails the oracle is wasted: check before you submit.
- `profile` returns a profile digest of the current best (it never feeds a verdict). `history` \
opens any past experiment (its patch, build report and check lines): learn from the dead ends \
in the run memory before you repeat them.
- End with `submit`: a one-line hypothesis (what should get faster and why), what you learned \
in this episode, and the idea you would try next. The lab takes the diff between the current \
best and your scratch copy. Submit exactly one idea, small enough that its effect can be \
attributed; do not resubmit an idea the run memory lists.
- You have a limited number of turns: read what you need, make the change, check, submit.
- Correctness is checked bit-for-bit or to the oracle's tolerance on inputs you cannot see: \
never special-case inputs, skip work, or read anything the harness did not give you.
"""

SYSTEM_RESEARCH = """\
You are the research agent of a benchmark lab. The lab hill-climbs the performance of one \
harness: an agent proposes one change at a time to the editable files, and the lab builds, \
checks, times and keeps or discards it. Your task now is to study the target (program.md below, \
the harness's files and references, the profile digest, and the run memory if the run has \
started) and produce a RANKED list of hypotheses worth trying, best first: for each, what to \
change, why it should be faster (tie it to the physical limit or a profile number), the expected \
gain, and the risk to correctness. If experiments already ran, do not list what the run memory \
shows as tried; prefer structurally different ideas. Read files with `editor` (view only). \
Finish with `finish_research`, giving the list as markdown.
"""

EDITOR_TOOL = {
    "name": "editor",
    "description": (
        "View files, and edit the editable surface. Paths are relative to the harness folder "
        f"(view '.' to list it); the run's own files are {RUN_PREFIX}log.md and {RUN_PREFIX}results.tsv. "
        "view: numbered lines (view_range [first, last], 1-based, -1 for the end; long files are "
        f"cut at {MAX_VIEW_CHARS} characters). str_replace: replace old_str, which must occur exactly "
        "once, by new_str. create: write file_text as the whole file. insert: put insert_text after "
        "line insert_line (0: at the top). Only editable files can be changed."),
    "input_schema": {
        "type": "object",
        "properties": {
            "command": {"type": "string", "enum": ["view", "str_replace", "create", "insert"]},
            "path": {"type": "string", "maxLength": 1024},
            "view_range": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
            "old_str": {"type": "string"},
            "new_str": {"type": "string"},
            "file_text": {"type": "string"},
            "insert_line": {"type": "integer"},
            "insert_text": {"type": "string"},
        },
        "required": ["command", "path"],
        "additionalProperties": False,
    },
}
COMPILE_TOOL = {
    "name": "compile",
    "description": ("Build your scratch copy of the editable files with the harness's own flags "
                    "(build only: no check, no timing). Returns the compiler report, or its errors."),
    "input_schema": {"type": "object", "properties": {}, "additionalProperties": False},
}
CHECK_TOOL = {
    "name": "check",
    "description": ("Run the harness's oracle on your draft (your scratch copy) with public seeds, "
                    "through the lab's own build and check; with timing (the default) also a short "
                    "informative timing against the current best. Neither is a verdict: the lab "
                    "re-checks a submission on secret inputs and times it properly. Costs run time; "
                    f"at most {MAX_DRAFT_CHECKS} per episode."),
    "input_schema": {"type": "object", "properties": {"timing": {"type": "boolean"}},
                     "additionalProperties": False},
}
PROFILE_TOOL = {
    "name": "profile",
    "description": "A profile digest of the current best (incumbent) build. Informative only.",
    "input_schema": {"type": "object", "properties": {}, "additionalProperties": False},
}
HISTORY_TOOL = {
    "name": "history",
    "description": ("Open a past experiment of this run by its number (#N in the run memory): its "
                    "hypothesis, outcome, patch, build report and check lines. part: patch, build, "
                    "check or all (default)."),
    "input_schema": {
        "type": "object",
        "properties": {"number": {"type": "integer", "minimum": 1},
                       "part": {"type": "string", "enum": ["patch", "build", "check", "all"]}},
        "required": ["number"],
        "additionalProperties": False,
    },
}
SUBMIT_TOOL = {
    "name": "submit",
    "description": ("Propose your change and end the episode. The lab takes the diff between the "
                    "current best and your scratch copy. Give a one-line hypothesis, what you "
                    "learned in this episode (facts for later episodes: what failed and why, "
                    "numbers), and the next idea worth trying."),
    "input_schema": {
        "type": "object",
        "properties": {
            "hypothesis": {"type": "string", "description": "one line: what should get faster and why"},
            "learned": {"type": "string", "description": "what this episode taught (kept in the run memory)"},
            "next_idea": {"type": "string", "description": "the idea you would try next"},
        },
        "required": ["hypothesis"],
        "additionalProperties": False,
    },
}
FINISH_RESEARCH_TOOL = {
    "name": "finish_research",
    "description": "End the research with a ranked list of hypotheses (markdown, best first).",
    "input_schema": {
        "type": "object",
        "properties": {"hypotheses": {"type": "string"}},
        "required": ["hypotheses"],
        "additionalProperties": False,
    },
}
WEB_SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}


class AnthropicAgent(Agent):
    name = "anthropic"

    def __init__(self, model: str | None = None, *, web_search: bool = False, max_turns: int = 30,
                 max_tokens: int = DEFAULT_MAX_TOKENS, max_episode_tokens: int = 1_500_000,
                 max_episode_usd: float = DEFAULT_MAX_EPISODE_USD, thinking: dict | None = None,
                 effort: dict | None = None, max_api_wait_s: float = DEFAULT_MAX_API_WAIT_S,
                 prices_file=None, base_url: str | None = None, api_key: str | None = None,
                 max_retries: int = 0, request_timeout_s: float = 600.0):
        self._sdk = require("anthropic")
        key = (api_key or os.environ.get("ANTHROPIC_API_KEY", "")).strip()
        if not key:
            raise AgentFatal("set ANTHROPIC_API_KEY to an Anthropic API key (console.anthropic.com, "
                             "API keys) to use the anthropic agent, or pick another with --agent "
                             "(command:CMD, replay:FILE)")
        self.model = model or DEFAULT_MODEL
        self.price = price_for(self.model, load_prices(prices_file))
        self.web_search = web_search
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.max_episode_tokens = max_episode_tokens
        self.max_episode_usd = max_episode_usd
        self.thinking = dict(DEFAULT_THINKING if thinking is None else thinking)
        self.effort = dict(DEFAULT_EFFORT if effort is None else effort)
        for phase, level in self.effort.items():
            if level and level not in EFFORTS:
                raise LabError(f"effort '{level}' for {phase} is none of {', '.join(EFFORTS)} (or off)")
        self.max_api_wait_s = max_api_wait_s
        self._key = key
        # The lab does the retrying (max_retries 0 by default): it waits longer than the SDK's
        # ~15 s, honours the rate-limit headers, and records every wait.
        self._client = self._sdk.Anthropic(api_key=key, base_url=base_url, max_retries=max_retries,
                                           timeout=request_timeout_s)
        self._spent = 0.0
        self.research_cost_usd = 0.0  # spent by research(); part of spent_usd
        self._profiles: dict[str, str] = {}
        self._report: Callable[..., None] = lambda type_, **payload: None
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"AnthropicAgent(model={self.model!r})"

    @property
    def spent_usd(self) -> float:
        return self._spent

    def settings(self) -> dict:
        """The model settings, for the run's record and the cost estimate."""
        return {"model": self.model, "max_tokens": self.max_tokens, "thinking": self.thinking,
                "effort": self.effort, "max_episode_usd": self.max_episode_usd,
                "max_api_wait_s": self.max_api_wait_s, "max_turns": self.max_turns, "stream": True}

    # --- the two kinds of episode -----------------------------------------------------------
    def propose(self, ctx: AgentContext) -> Proposal:
        tree = stage_scratch(ctx)
        bench = Workbench(ctx, tree)
        transcript = Transcript(episode_path(ctx.run_dir, "episode"), secret=self._key)
        self._report = ctx.report if ctx.report is not None else (lambda type_, **payload: None)
        checks = {"n": 0}

        def submit(args: dict):
            patch = diff_trees(Path(ctx.incumbent_tree), tree, ctx.editable)
            notes = {k: " ".join(str(args.get(k) or "").split())[:MAX_NOTE_CHARS] for k in ("learned", "next_idea")}
            if not patch:
                return None, "submitted no change"
            return (patch, hypothesis_line(args.get("hypothesis", "")) or "(no hypothesis given)", notes), ""

        def check(args: dict) -> str:
            if ctx.check is None:
                raise ToolError("check is not available in this run")
            if checks["n"] >= MAX_DRAFT_CHECKS:
                raise ToolError(f"{MAX_DRAFT_CHECKS} checks were run in this episode already: submit, or "
                                "fix what the last check said")
            checks["n"] += 1
            try:
                return ctx.check(tree, bool(args.get("timing", True)))
            except LabError as exc:  # a locked file changed, no editable file left, ...
                raise ToolError(f"the check could not run: {exc}") from None

        handlers = {"editor": bench.edit, "compile": lambda args: self._compile(ctx, tree),
                    "check": check, "profile": lambda args: self._profile(ctx),
                    "history": lambda args: self._history(ctx, args)}
        brief = run_brief(ctx) + ("\n\nPropose one change now: read, edit your scratch copy, "
                                  "check it, then submit with a one-line hypothesis.")
        ep = self._episode(ctx, transcript, "propose", SYSTEM_PROPOSE, brief,
                           [EDITOR_TOOL, COMPILE_TOOL, CHECK_TOOL, PROFILE_TOOL, HISTORY_TOOL, SUBMIT_TOOL],
                           handlers, finish=("submit", submit), final_text_ends=False)
        patch, hypothesis, notes = ep.result or ("", "", dict[str, str]())
        return Proposal(patch=patch, hypothesis=hypothesis, cost_usd=ep.cost, usage=ep.usage,
                        failure=ep.failure, transcript=str(transcript.path),
                        learned=notes.get("learned", ""), next_idea=notes.get("next_idea", ""),
                        api_unavailable=ep.api_unavailable)

    def research(self, ctx: AgentContext) -> str:
        tree = stage_scratch(ctx)
        bench = Workbench(ctx, tree)
        transcript = Transcript(episode_path(ctx.run_dir, "research"), secret=self._key)
        self._report = ctx.report if ctx.report is not None else (lambda type_, **payload: None)

        def view_only(args: dict) -> str:
            if args.get("command") != "view":
                raise ToolError("research is read-only: use the view command")
            return bench.edit(args)

        def finish(args: dict):
            text = (args.get("hypotheses") or "").strip()
            return (text, "") if text else (None, "finish_research gave no hypotheses")

        tools = [EDITOR_TOOL, PROFILE_TOOL, HISTORY_TOOL, FINISH_RESEARCH_TOOL] + (
            [WEB_SEARCH_TOOL] if self.web_search else [])
        private = tuple(DEFAULT_PRIVATE) + tuple(ctx.private or ())
        first = (run_brief(ctx) + "\n\n## References\n\n" + _references(Path(ctx.harness_root), private)
                 + "\n\n## Profile digest of the incumbent\n\n" + self._profile_or_note(ctx)
                 + "\n\nStudy these, then call finish_research with your ranked list of hypotheses.")
        ep = self._episode(ctx, transcript, "research", SYSTEM_RESEARCH, first, tools,
                           {"editor": view_only, "profile": lambda args: self._profile(ctx),
                            "history": lambda args: self._history(ctx, args)},
                           finish=("finish_research", finish), final_text_ends=True)
        self.research_cost_usd += ep.cost
        if ep.failure:
            raise LabError(f"research: {ep.failure} (transcript {transcript.path})")
        return ep.result

    # --- the episode loop -------------------------------------------------------------------
    def _episode(self, ctx: AgentContext, transcript: Transcript, phase: str, system_text: str, first: str,
                 tools: list[dict], handlers: dict[str, Callable[[dict], str]],
                 finish: tuple[str, Callable], final_text_ends: bool) -> "_Episode":
        """Run turns until the finish tool succeeds (or, for research, the model ends with text),
        a cap (turns, tokens, dollars, truncations) is reached, or the API fails."""
        ep = _Episode()
        system: list[dict] = [{"type": "text", "text": system_text},
                  {"type": "text", "text": "# program.md (the harness's operating notes)\n\n" + (ctx.program_md or "(none)"),
                   "cache_control": {"type": "ephemeral"}}]
        messages: list[dict] = [{"role": "user", "content": [{"type": "text", "text": first}]}]
        spec = _EpisodeSpec(phase=phase, system=system, tools=tools,
                            schemas={t["name"]: t.get("input_schema") for t in tools if "input_schema" in t},
                            handlers=handlers, finish_name=finish[0], finish_fn=finish[1],
                            final_text_ends=final_text_ends, transcript=transcript)
        transcript.write({"type": "episode", "model": self.model, "harness": ctx.harness_name, "phase": phase,
                          "tools": [t["name"] for t in tools], "max_turns": self.max_turns,
                          "settings": self.settings(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        transcript.write({"type": "system", "content": system})
        transcript.write({"type": "message", **messages[0]})
        try:
            self._turns(ep, spec, messages)
        except _ApiFailure as exc:
            ep.failure = str(exc)
            ep.api_unavailable = exc.unavailable
        ep.cost = round(ep.cost, 10)
        transcript.write({"type": "end", "failure": ep.failure, "cost_usd": ep.cost, "usage": ep.usage})
        return ep

    def _turns(self, ep: "_Episode", spec: "_EpisodeSpec", messages: list[dict]) -> None:
        """The turns of one episode, each a request and the user turn that answers it, until one
        ends it: ep.result or ep.failure says how. An _ApiFailure goes up to the caller."""
        truncations = 0
        for turn in range(1, self.max_turns + 1):
            ep.failure = self._cap_reached(ep, turn - 1)
            if ep.failure:
                return
            response = self._call(spec.system, spec.tools, messages, spec.phase, spec.transcript)
            content = self._account(ep, turn, response, spec.transcript)
            ep.failure = self._stop_failure(response.stop_reason, spec.phase)
            if ep.failure:
                return
            if response.stop_reason == "max_tokens":
                truncations += 1
                ep.failure = self._truncated(spec, messages, content, truncations)
                if ep.failure:
                    return
                continue
            messages.append({"role": "assistant", "content": content})
            if response.stop_reason == "pause_turn":  # a server tool paused: let it go on
                continue
            reply = self._answer(ep, spec, content)
            if reply is None:
                return
            left = self.max_turns - turn
            if 0 < left <= 2:
                reply.append({"type": "text", "text": f"({left} turn{'s' if left > 1 else ''} left: "
                                                      f"call {spec.finish_name} now with your best work)"})
            messages.append({"role": "user", "content": reply})
            spec.transcript.write({"type": "message", "role": "user", "content": reply})
        ep.failure = f"no {spec.finish_name} within {self.max_turns} turns"

    def _cap_reached(self, ep: "_Episode", turns_done: int) -> str:
        """Why the episode may not make another request (its tokens or dollars are spent), or ""."""
        if ep.tokens >= self.max_episode_tokens:
            return f"token cap of {self.max_episode_tokens} reached within {turns_done} turns"
        if self.max_episode_usd and ep.cost >= self.max_episode_usd:
            return f"episode cost cap of ${self.max_episode_usd:.2f} reached within {turns_done} turns"
        return ""

    def _account(self, ep: "_Episode", turn: int, response, transcript: Transcript) -> list[dict]:
        """Add one response's tokens and dollars to the episode and to the agent's spend, record it in
        the transcript, and return its content blocks as the API takes them back."""
        ep.usage["turns"] = turn
        usage = _usage(response)
        cost = cost_usd(usage, self.price)
        ep.add(usage, cost)
        self._spent += cost
        content = [block.to_dict(mode="json") for block in response.content]
        transcript.write({"type": "message", "role": "assistant", "content": content,
                          "stop_reason": response.stop_reason, "usage": usage, "cost_usd": cost})
        return content

    def _stop_failure(self, stop_reason: str | None, phase: str) -> str:
        """Why a response's stop reason ends the episode (the model refused, the context is full), or ""."""
        if stop_reason == "refusal":
            self._fault("refusal", "the model refused to continue", phase)
            return "the model refused to continue"
        if stop_reason == "model_context_window_exceeded":
            return "the episode outgrew the model's context window"
        return ""

    def _truncated(self, spec: "_EpisodeSpec", messages: list[dict], content: list[dict], truncations: int) -> str:
        """A response cut at max_tokens: a tool call in it may be incomplete (a half-written file), so
        nothing in it runs; the text stays as context and the model is asked to go on smaller.
        Returns the episode's failure once MAX_TRUNCATIONS responses were cut, else ""."""
        calls = sum(1 for b in content if b.get("type") == "tool_use")
        self._fault("truncated", f"a response reached max_tokens ({self.max_tokens}); "
                    f"{calls} tool call(s) in it discarded", spec.phase)
        if truncations >= MAX_TRUNCATIONS:
            return f"{truncations} responses cut at max_tokens ({self.max_tokens}); nothing of them ran"
        kept = [{"type": "text", "text": b["text"]} for b in content
                if b.get("type") == "text" and (b.get("text") or "").strip()]
        messages.append({"role": "assistant", "content": kept or [
            {"type": "text", "text": "(this response was cut at the output limit)"}]})
        reply = [{"type": "text", "text": (
            f"Your last response reached the output limit ({self.max_tokens} tokens) and was cut "
            f"off; it was discarded and none of its {calls} tool call(s) ran. Go on in smaller "
            "steps: str_replace a few lines at a time rather than create a whole file, and "
            "think less before each call.")}]
        messages.append({"role": "user", "content": reply})
        spec.transcript.write({"type": "message", "role": "user", "content": reply})
        return ""

    def _answer(self, ep: "_Episode", spec: "_EpisodeSpec", content: list[dict]) -> list[dict] | None:
        """The user turn that answers a complete assistant turn: the results of its tool calls, or a
        reminder to use the tools; None when this turn ends the episode (ep.result, ep.failure set)."""
        uses = [b for b in content if b.get("type") == "tool_use"]
        if not uses:
            text = "\n".join(b.get("text", "") for b in content if b.get("type") == "text").strip()
            if spec.final_text_ends and text:
                ep.result = text
                return None
            return [{"type": "text", "text": f"Use the tools; end the episode with {spec.finish_name}."}]
        reply, done = self._run_tools(uses, spec.handlers, spec.schemas, spec.finish_name, spec.finish_fn,
                                      spec.phase)
        if done is not None:
            ep.result, ep.failure = done
            return None
        return reply

    def _run_tools(self, uses: list[dict], handlers: dict, schemas: dict, finish_name: str,
                   finish_fn: Callable, phase: str):
        """Results of the tool calls of one assistant turn; `done` is (result, failure) once the
        finish tool was called with valid input (the calls after it are not run). Every call
        gives a result or an error result: a bad input or a tool that raised never goes further."""
        results = []
        for use in uses:
            name, args = use.get("name"), use.get("input")
            problem = validate_input(schemas.get(name), args) if name in schemas else (
                f"there is no tool '{name}'")
            if problem:
                self._fault("bad_tool_input", f"{name}: {problem}", phase)
                results.append(_result(use, f"invalid input for '{name}': {problem}", True))
                continue
            if name == finish_name:
                try:
                    result, failure = finish_fn(args)
                except Exception as exc:  # the finish tool is the lab's; it still never ends the run
                    self._fault("tool_crash", f"{name}: {type(exc).__name__}: {exc}", phase)
                    results.append(_result(use, f"{name} failed inside the lab ({type(exc).__name__}); "
                                                "try again", True))
                    continue
                return results, (result, failure)
            try:
                if name not in handlers:
                    raise ToolError(f"the tool '{name}' is not available in this episode")
                text, is_error = handlers[name](args), False
            except ToolError as exc:
                text, is_error = str(exc), True
            except Exception as exc:  # a bug or an OS error in a tool: the model hears of it, the run goes on
                self._fault("tool_crash", f"{name}: {type(exc).__name__}: {str(exc)[:300]}", phase)
                text, is_error = f"the {name} tool failed inside the lab ({type(exc).__name__}: {str(exc)[:300]})", True
            if not isinstance(text, str):
                text = str(text)
            if len(text) > MAX_TOOL_RESULT_CHARS:
                text = text[:MAX_TOOL_RESULT_CHARS] + f"\n... (cut at {MAX_TOOL_RESULT_CHARS} characters)"
            results.append(_result(use, text, is_error))
        return results, None

    def _fault(self, kind: str, text: str, phase: str) -> None:
        self._report("agent_fault", kind=kind, phase=phase, text=self._redact(text)[:500])

    # --- the tools backed by the lab --------------------------------------------------------
    def _compile(self, ctx: AgentContext, tree: Path) -> str:
        if ctx.compile is None:
            raise ToolError("compile is not available in this run")
        try:
            build = ctx.compile(tree)
        except LabError as exc:
            raise ToolError(f"the build could not start: {exc}") from None
        if not build.ok:
            raise ToolError("build failed:\n" + (build.error or build.report or "(no compiler output)"))
        return f"build ok ({build.seconds:.1f} s)" + (f"\n{build.report}" if build.report.strip() else "")

    def _profile(self, ctx: AgentContext) -> str:
        """The incumbent's profile digest, once per incumbent: a profiler that fails or hangs past
        its timeout (ncu) gives a tool error, remembered, so later episodes do not wait again."""
        if ctx.profile is None:
            raise ToolError("no profile is available for this harness")
        key = tree_hash(Path(ctx.incumbent_tree), editable_files(Path(ctx.incumbent_tree), ctx.editable))
        if key not in self._profiles:
            try:
                self._profiles[key] = ctx.profile() or "(the harness gives no profile)"
            except Exception as exc:  # TimeoutExpired, OSError, a harness bug: never the run's end
                self._profiles[key] = f"profiling failed: {type(exc).__name__}: {str(exc)[:500]}"
        text = self._profiles[key]
        if text.startswith("profiling failed: "):
            raise ToolError(text)
        return text

    def _profile_or_note(self, ctx: AgentContext) -> str:
        try:
            return self._profile(ctx)
        except ToolError as exc:
            return f"({exc})"

    def _history(self, ctx: AgentContext, args: dict) -> str:
        from ..store import RunFolder

        return past_candidate(ctx.run_dir, RunFolder(ctx.run_dir).events(), args["number"], args.get("part") or "all")

    # --- the API ----------------------------------------------------------------------------
    def _request_options(self, phase: str) -> dict:
        options = {}
        if self.thinking.get(phase):
            options["thinking"] = {"type": self.thinking[phase]}
        if self.effort.get(phase):
            options["output_config"] = {"effort": self.effort[phase]}
        return options

    def _call(self, system: list[dict], tools: list[dict], messages: list[dict], phase: str = "propose",
              transcript: Transcript | None = None):
        """One Messages API call, streamed, waited through outages: cache breakpoints on the
        system prompt (with the tools before it) and on the conversation up to its last user turn."""
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        sent = list(messages)
        sent[last_user] = copy.deepcopy(messages[last_user])
        sent[last_user]["content"][-1]["cache_control"] = {"type": "ephemeral"}
        clock = _clock.current()
        outage_start, attempt, last = None, 0, ""
        while True:
            try:
                with self._client.messages.stream(model=self.model, max_tokens=self.max_tokens, system=system,
                                                  tools=tools, messages=sent, **self._request_options(phase)) as stream:
                    response = stream.get_final_message()
                if outage_start is not None:
                    waited = clock.now() - outage_start
                    self._report("api_recovered", attempts=attempt, outage_s=round(waited, 1),
                                 text=f"the API answers again after {_duration(waited)} ({attempt} retries)")
                return response
            except Exception as exc:
                problem = self._classify(exc)
                if not isinstance(problem, _Transient):
                    raise problem from None
            now = clock.now()
            outage_start = now if outage_start is None else outage_start
            attempt += 1
            waited = now - outage_start
            wait = self._backoff(attempt, problem.hint_s)
            last = f"{problem.status} {problem.text}" if problem.status else problem.text
            if waited + wait > self.max_api_wait_s:
                self._report("api_wait", kind=problem.kind, status=problem.status, attempt=attempt,
                             wait_s=0, outage_s=round(waited, 1), gave_up=True,
                             text=f"API {problem.kind}: given up after {_duration(waited)} "
                                  f"(limit {_duration(self.max_api_wait_s)}); this proposal fails, the run goes on")
                raise _ApiFailure(f"api unavailable for {_duration(waited)} ({attempt} attempts; last: {last})",
                                  unavailable=True)
            self._report("api_wait", kind=problem.kind, status=problem.status, attempt=attempt,
                         wait_s=round(wait, 2), outage_s=round(waited, 1), hint_s=problem.hint_s,
                         text=f"API {problem.kind} ({problem.status or 'no status'}): waiting {_duration(wait)}, "
                              f"{_duration(waited)} into this outage (gives up at {_duration(self.max_api_wait_s)})")
            if transcript is not None:
                transcript.write({"type": "api_wait", "kind": problem.kind, "status": problem.status,
                                  "attempt": attempt, "wait_s": wait, "detail": last})
            clock.sleep(wait)
            if _clock.stop_waiting.is_set():  # Ctrl-C: the run is stopping, stop waiting for the API
                raise _ApiFailure(f"waiting for the API was interrupted (last: {last})", unavailable=True)

    def _backoff(self, attempt: int, hint_s: float | None) -> float:
        """Seconds to wait before retry `attempt`: the server's hint (retry-after, rate-limit reset)
        plus a little jitter, or exponential back-off with full jitter when it gave none."""
        if hint_s is not None and hint_s >= 0:
            return hint_s + self._random.uniform(0, min(5.0, 0.1 * hint_s + 0.5))
        ceiling = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** (attempt - 1))
        return self._random.uniform(ceiling / 2, ceiling)

    def _classify(self, exc: Exception) -> Exception:
        """AgentFatal for what no retry can fix; _Transient for what waiting fixes; _ApiFailure
        (this proposal fails) for what concerns this conversation only."""
        sdk = self._sdk
        if isinstance(exc, (AgentFatal, _ApiFailure, _Transient)):
            return exc
        if isinstance(exc, sdk.APIConnectionError) or _is_transport_error(exc):
            kind = "timeout" if isinstance(exc, sdk.APITimeoutError) or "timeout" in type(exc).__name__.lower() else "connection"
            return _Transient(kind, None, self._redact(f"{type(exc).__name__}: {exc}")[:300], None)
        if not isinstance(exc, sdk.APIError):  # e.g. a response the SDK cannot parse
            text = f"{type(exc).__name__}: {self._redact(str(exc))[:300]}"
            self._fault("unreadable_response", text, "api")
            return _ApiFailure(f"api error: {text}")
        status = getattr(exc, "status_code", None)
        detail = self._redact(_error_detail(exc))
        etype = _error_type(exc)
        if isinstance(exc, sdk.AuthenticationError) or status == 401:
            return AgentFatal(f"the Anthropic API refused the key (401: {detail}); check ANTHROPIC_API_KEY")
        if status == 402 or any(m in detail.lower() for m in SPEND_MARKERS):
            return AgentFatal(f"the Anthropic account may not spend more ({status}: {detail}); add credit "
                              "or raise its spend limit, then continue with `lab run --resume RUN`")
        if isinstance(exc, sdk.PermissionDeniedError) or status == 403:
            return AgentFatal(f"the key may not use the model '{self.model}' (403: {detail})")
        if isinstance(exc, sdk.NotFoundError) or status == 404:
            return AgentFatal(f"the model '{self.model}' was not found (404: {detail}); pick another with --agent-model")
        if status == 429 or etype == "rate_limit_error":
            return _Transient("rate_limited", status, detail, _server_hint(exc, _clock.current()))
        if status == 529 or etype == "overloaded_error":
            return _Transient("overloaded", status, detail, _server_hint(exc, _clock.current()))
        if (status is not None and (status >= 500 or status in (408, 409))) or etype in TRANSIENT_TYPES:
            return _Transient("server_error", status, detail, _server_hint(exc, _clock.current()))
        if status in (400, 413, 422) and any(m in detail.lower() for m in TOO_LONG_MARKERS):
            return _ApiFailure(f"api error: {status} {detail} (this episode's conversation grew too long)")
        if status in (400, 413, 422):
            return AgentFatal(f"the Anthropic API refused the request as malformed ({status}: {detail}); "
                              f"this will not clear by retrying: check --agent-model and the model settings "
                              f"(max_tokens {self.max_tokens}, thinking {self.thinking}, effort {self.effort})")
        return _ApiFailure(f"api error: {status} {detail}")

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text


class _ApiFailure(Exception):
    def __init__(self, message: str, unavailable: bool = False):
        super().__init__(message)
        self.unavailable = unavailable


class _Transient(Exception):
    """A failure that waiting fixes: kind (overloaded, rate_limited, server_error, connection,
    timeout), HTTP status, detail, and the server's hint of how long to wait (None: none)."""

    def __init__(self, kind: str, status: int | None, text: str, hint_s: float | None):
        super().__init__(text)
        self.kind, self.status, self.text, self.hint_s = kind, status, text, hint_s


class _Episode:
    def __init__(self) -> None:
        self.usage: dict = {k: 0 for k in USAGE_KEYS}
        self.cost = 0.0
        self.result: Any = None
        self.failure = ""
        self.api_unavailable = False

    @property
    def tokens(self) -> int:
        return sum(self.usage[k] for k in USAGE_KEYS)

    def add(self, usage: dict, cost: float) -> None:
        for k, v in usage.items():
            self.usage[k] = self.usage.get(k, 0) + v
        self.cost += cost


@dataclass(frozen=True)
class _EpisodeSpec:
    """What every turn of one episode works with: the request's fixed parts, the tools' handlers and
    schemas, the finish tool, and the transcript."""

    phase: str
    system: list[dict]
    tools: list[dict]
    schemas: dict[str, Any]
    handlers: dict[str, Callable[[dict], str]]
    finish_name: str
    finish_fn: Callable
    final_text_ends: bool  # research: a final answer in text (no tool call) ends the episode
    transcript: Transcript


def _result(use: dict, text: str, is_error: bool) -> dict:
    return {"type": "tool_result", "tool_use_id": use.get("id"), "content": text, "is_error": is_error}


_JSON_TYPES: dict[str, Any] = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict, "number": (int, float)}


def validate_input(schema: dict | None, value, where: str = "input") -> str:
    """The first way `value` breaks the (small) JSON schema of a tool, or "" if it fits: types,
    required and unknown properties, enums, lengths, integer minimums. Enough for the lab's own
    tools; the model's input is never trusted to match what it was asked for."""
    if schema is None:
        return ""
    kind = schema.get("type")
    if kind:
        py = _JSON_TYPES[kind]
        if (isinstance(value, bool) and kind in ("integer", "number")) or not isinstance(value, py):
            return f"{where} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not {_json_type(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {', '.join(map(str, schema['enum']))}, not {str(value)[:50]!r}"
    if kind == "string":
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{where} is longer than {schema['maxLength']} characters"
        if "\0" in value:
            return f"{where} holds a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where} is not valid UTF-8"
    if kind == "integer" and "minimum" in schema and value < schema["minimum"]:
        return f"{where} must be at least {schema['minimum']}"
    if kind == "array":
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            return f"{where} must have {schema.get('minItems')} items"
        for i, item in enumerate(value):
            problem = validate_input(schema.get("items"), item, f"{where}[{i}]")
            if problem:
                return problem
    if kind == "object":
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if value.get(name) is None:
                return f"'{name}' is required"
        if schema.get("additionalProperties") is False:
            extra = sorted(k for k in value if k not in props)
            if extra:
                return f"unknown argument(s) {', '.join(map(str, extra))[:200]}; the arguments are {', '.join(props)}"
        for name, sub in props.items():
            if value.get(name) is not None:
                problem = validate_input(sub, value[name], f"'{name}'")
                if problem:
                    return problem
    return ""


def _json_type(value) -> str:
    for name, py in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                     ("string", str), ("array", list), ("object", dict)):
        if isinstance(value, py):
            return name
    return type(value).__name__


def _usage(response) -> dict:
    u = response.usage
    out = {k: int(getattr(u, k, 0) or 0) for k in USAGE_KEYS}
    searches = getattr(getattr(u, "server_tool_use", None), "web_search_requests", 0) or 0
    if searches:
        out["web_search_requests"] = int(searches)
    return out


def _error_detail(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return f"{err.get('type', 'error')}: {err.get('message', '')}".strip()
    return str(getattr(exc, "message", "") or exc)


def _error_type(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("type", ""))
    return ""


def _is_transport_error(exc: Exception) -> bool:
    """A connection dropped or stalled below the SDK (an httpx error mid-stream, a socket error)."""
    module = type(exc).__module__ or ""
    return isinstance(exc, (OSError, TimeoutError)) or module.startswith(("httpx", "httpcore", "h11"))


def _server_hint(exc, clock) -> float | None:
    """How long the server asks us to wait: retry-after-ms, retry-after (seconds or a date), or
    the latest reset time of an exhausted rate limit (anthropic-ratelimit-*-reset, RFC 3339)."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms"):
            return max(float(headers["retry-after-ms"]) / 1000, 0.0)
    except ValueError:
        pass
    hint = None
    value = headers.get("retry-after")
    if value:
        try:
            hint = max(float(value), 0.0)
        except ValueError:
            try:
                from email.utils import parsedate_to_datetime

                hint = max(parsedate_to_datetime(value).timestamp() - clock.wall(), 0.0)
            except (TypeError, ValueError):
                hint = None
    resets = []
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        remaining = headers.get(f"anthropic-ratelimit-{kind}-remaining")
        reset = headers.get(f"anthropic-ratelimit-{kind}-reset")
        if reset and remaining is not None and remaining.strip() == "0":
            try:
                when = _dt.datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp()
                resets.append(max(when - clock.wall(), 0.0))
            except ValueError:
                pass
    if resets:
        hint = max([hint or 0.0, *resets])
    return hint


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _references(root: Path, private=DEFAULT_PRIVATE) -> str:
    """The harness's references/ folder, inlined up to MAX_REFERENCE_CHARS (the rest listed),
    without what the harness marks private."""
    folder = root / "references"
    if not folder.is_dir() or is_private("references", private):
        return "(this harness has no references/ folder)"
    parts, size = [], 0
    root = root.resolve()
    for rel in tree_files(folder):
        path = folder / rel
        resolved = path.resolve()
        if is_private(f"references/{rel}", private) or root not in resolved.parents or is_private(
                resolved.relative_to(root).as_posix(), private):
            continue
        if path.stat().st_size > MAX_REFERENCE_CHARS * 4:
            parts.append(f"- references/{rel} ({path.stat().st_size} bytes: view it with the editor)")
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            parts.append(f"- references/{rel} (binary, {path.stat().st_size} bytes)")
            continue
        if size + len(text) > MAX_REFERENCE_CHARS:
            parts.append(f"- references/{rel} ({len(text)} characters: view it with the editor)")
            continue
        size += len(text)
        parts.append(f"### references/{rel}\n\n{text.rstrip()}")
    return "\n\n".join(parts) or "(references/ is empty)"
