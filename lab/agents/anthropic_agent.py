"""The LLM agent: a short tool-use episode on the Anthropic Messages API per proposal.

Each episode starts from the run's brief (program.md in the system prompt; the current best
source, the results, the recent failures and log.md in the first message). The model works on a
scratch copy of the editable files with an editor that refuses every other path, may build its
copy (`compile`) and read a profile of the incumbent (`profile`), and ends with `submit` and a
one-line hypothesis. The proposal is the diff from the incumbent to the scratch copy: the model
never writes a result, and never touches the run's tree.

Failures of the API never stop a run (the proposal carries `failure="api error: ..."`; the SDK
itself retries 429, 5xx and 529 with backoff), except those no retry can fix: a refused key
(401), a forbidden model (403), an unknown model (404) and an exhausted credit or spend limit.
Those raise AgentFatal and the run stops cleanly. The API key reaches the SDK's client and
nothing else: transcripts and messages are scrubbed of it.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Callable

from ..errors import LabError
from ..extras import require
from ..harness import _walk, tree_hash
from .base import Agent, AgentContext, AgentFatal, Proposal
from .prices import DEFAULT_MODEL, cost_usd, load_prices, price_for
from .tools import (MAX_VIEW_CHARS, RUN_PREFIX, ToolError, Transcript, Workbench, diff_trees,
                    editable_files, episode_path, hypothesis_line, run_brief, stage_scratch)

MAX_TOOL_RESULT_CHARS = 20_000
MAX_REFERENCE_CHARS = 100_000
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Phrases of the API's errors for an account that may not spend more (credit, spend limit).
SPEND_MARKERS = ("credit balance", "spend limit", "spending limit", "usage limits", "billing", "spend_limit")

SYSTEM_PROPOSE = """\
You are the proposal agent of a benchmark lab. The lab hill-climbs the performance of one \
harness: you propose ONE change to its editable files; the lab (not you) builds it, checks it \
against a locked oracle on secret inputs, times it against the current best in interleaved \
pairs, and keeps it only if it is correct and measurably faster. You never run the benchmark \
and never write a result.

How to work in this episode:
- Your editable files are a scratch copy of the current best source. Read them and the locked \
harness files with `editor` (command view); change the editable files with `editor` \
(str_replace, create, insert). Every other path is locked and refused.
- `compile` builds your scratch copy with the harness's own flags (build only) and returns the \
compiler's report or errors. Use it before you submit: a change that does not build is wasted.
- `profile` returns a profile digest of the current best (it never feeds a verdict).
- End with `submit` and a one-line hypothesis: what should get faster and why. The lab takes \
the diff between the current best and your scratch copy. Submit exactly one idea, small enough \
that its effect can be attributed; do not resubmit a hypothesis that was already tried.
- You have a limited number of turns: read what you need, make the change, compile, submit.
- Correctness is checked bit-for-bit or to the oracle's tolerance on inputs you cannot see: \
never special-case inputs, skip work, or read anything the harness did not give you.
"""

SYSTEM_RESEARCH = """\
You are the research agent of a benchmark lab, before its first experiment. The lab will \
hill-climb the performance of one harness: an agent proposes one change at a time to the \
editable files, and the lab builds, checks, times and keeps or discards it. Your task now is to \
study the target (program.md below, the harness's files and references, the profile digest) \
and produce a RANKED list of hypotheses worth trying, best first: for each, what to change, \
why it should be faster (tie it to the physical limit or a profile number), the expected gain, \
and the risk to correctness. Read files with `editor` (view only). Finish with \
`finish_research`, giving the list as markdown.
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
            "path": {"type": "string"},
            "view_range": {"type": "array", "items": {"type": "integer"}},
            "old_str": {"type": "string"},
            "new_str": {"type": "string"},
            "file_text": {"type": "string"},
            "insert_line": {"type": "integer"},
            "insert_text": {"type": "string"},
        },
        "required": ["command", "path"],
    },
}
COMPILE_TOOL = {
    "name": "compile",
    "description": ("Build your scratch copy of the editable files with the harness's own flags "
                    "(build only: no check, no timing). Returns the compiler report, or its errors."),
    "input_schema": {"type": "object", "properties": {}},
}
PROFILE_TOOL = {
    "name": "profile",
    "description": "A profile digest of the current best (incumbent) build. Informative only.",
    "input_schema": {"type": "object", "properties": {}},
}
SUBMIT_TOOL = {
    "name": "submit",
    "description": ("Propose your change and end the episode. The lab takes the diff between the "
                    "current best and your scratch copy; give a one-line hypothesis."),
    "input_schema": {
        "type": "object",
        "properties": {"hypothesis": {"type": "string",
                                      "description": "one line: what should get faster and why"}},
        "required": ["hypothesis"],
    },
}
FINISH_RESEARCH_TOOL = {
    "name": "finish_research",
    "description": "End the research with a ranked list of hypotheses (markdown, best first).",
    "input_schema": {
        "type": "object",
        "properties": {"hypotheses": {"type": "string"}},
        "required": ["hypotheses"],
    },
}
WEB_SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}


class AnthropicAgent(Agent):
    name = "anthropic"

    def __init__(self, model: str | None = None, *, web_search: bool = False, max_turns: int = 30,
                 max_tokens: int = 8000, max_episode_tokens: int = 1_500_000, prices_file=None,
                 base_url: str | None = None, api_key: str | None = None, max_retries: int = 4,
                 request_timeout_s: float = 600.0):
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
        self._key = key
        # An explicit timeout also lifts the SDK's refusal of long non-streaming requests.
        self._client = self._sdk.Anthropic(api_key=key, base_url=base_url, max_retries=max_retries,
                                           timeout=request_timeout_s)
        self._spent = 0.0
        self.research_cost_usd = 0.0  # spent by research(); part of spent_usd
        self._profiles: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"AnthropicAgent(model={self.model!r})"

    @property
    def spent_usd(self) -> float:
        return self._spent

    # --- the two kinds of episode -----------------------------------------------------------
    def propose(self, ctx: AgentContext) -> Proposal:
        tree = stage_scratch(ctx)
        bench = Workbench(ctx, tree)
        transcript = Transcript(episode_path(ctx.run_dir, "episode"), secret=self._key)

        def submit(args: dict):
            patch = diff_trees(Path(ctx.incumbent_tree), tree, ctx.editable)
            if not patch:
                return None, "submitted no change"
            return (patch, hypothesis_line(args.get("hypothesis", "")) or "(no hypothesis given)"), ""

        handlers = {"editor": bench.edit, "compile": lambda args: self._compile(ctx, tree),
                    "profile": lambda args: self._profile(ctx)}
        brief = run_brief(ctx) + ("\n\nPropose one change now: read, edit your scratch copy, "
                                  "compile, then submit with a one-line hypothesis.")
        ep = self._episode(ctx, transcript, SYSTEM_PROPOSE, brief,
                           [EDITOR_TOOL, COMPILE_TOOL, PROFILE_TOOL, SUBMIT_TOOL],
                           handlers, finish=("submit", submit), final_text_ends=False)
        patch, hypothesis = ep.result or ("", "")
        return Proposal(patch=patch, hypothesis=hypothesis, cost_usd=ep.cost, usage=ep.usage,
                        failure=ep.failure, transcript=str(transcript.path))

    def research(self, ctx: AgentContext) -> str:
        tree = stage_scratch(ctx)
        bench = Workbench(ctx, tree)
        transcript = Transcript(episode_path(ctx.run_dir, "research"), secret=self._key)

        def view_only(args: dict) -> str:
            if args.get("command") != "view":
                raise ToolError("research is read-only: use the view command")
            return bench.edit(args)

        def finish(args: dict):
            text = (args.get("hypotheses") or "").strip()
            return (text, "") if text else (None, "finish_research gave no hypotheses")

        tools = [EDITOR_TOOL, PROFILE_TOOL, FINISH_RESEARCH_TOOL] + ([WEB_SEARCH_TOOL] if self.web_search else [])
        first = (run_brief(ctx) + "\n\n## References\n\n" + _references(Path(ctx.harness_root))
                 + "\n\n## Profile digest of the incumbent\n\n" + self._profile_or_note(ctx)
                 + "\n\nStudy these, then call finish_research with your ranked list of hypotheses.")
        ep = self._episode(ctx, transcript, SYSTEM_RESEARCH, first, tools,
                           {"editor": view_only, "profile": lambda args: self._profile(ctx)},
                           finish=("finish_research", finish), final_text_ends=True)
        self.research_cost_usd += ep.cost
        if ep.failure:
            raise LabError(f"research: {ep.failure} (transcript {transcript.path})")
        return ep.result

    # --- the episode loop -------------------------------------------------------------------
    def _episode(self, ctx: AgentContext, transcript: Transcript, system_text: str, first: str,
                 tools: list[dict], handlers: dict[str, Callable[[dict], str]],
                 finish: tuple[str, Callable], final_text_ends: bool) -> "_Episode":
        """Run turns until the finish tool succeeds (or, for research, the model ends with text),
        the turn or token cap is reached, or the API fails."""
        ep = _Episode()
        system = [{"type": "text", "text": system_text},
                  {"type": "text", "text": "# program.md (the harness's operating notes)\n\n" + (ctx.program_md or "(none)"),
                   "cache_control": {"type": "ephemeral"}}]
        messages: list[dict] = [{"role": "user", "content": [{"type": "text", "text": first}]}]
        transcript.write({"type": "episode", "model": self.model, "harness": ctx.harness_name,
                          "tools": [t["name"] for t in tools], "max_turns": self.max_turns,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        transcript.write({"type": "system", "content": system})
        transcript.write({"type": "message", **messages[0]})
        finish_name, finish_fn = finish
        try:
            for turn in range(1, self.max_turns + 1):
                if ep.tokens >= self.max_episode_tokens:
                    ep.failure = f"token cap of {self.max_episode_tokens} reached within {turn - 1} turns"
                    break
                response = self._call(system, tools, messages)
                ep.usage["turns"] = turn
                usage = _usage(response)
                cost = cost_usd(usage, self.price)
                ep.add(usage, cost)
                self._spent += cost
                content = [block.to_dict(mode="json") for block in response.content]
                messages.append({"role": "assistant", "content": content})
                transcript.write({"type": "message", "role": "assistant", "content": content,
                                  "stop_reason": response.stop_reason, "usage": usage, "cost_usd": cost})
                if response.stop_reason == "refusal":
                    ep.failure = "the model refused to continue"
                    break
                if response.stop_reason == "model_context_window_exceeded":
                    ep.failure = "the episode outgrew the model's context window"
                    break
                if response.stop_reason == "pause_turn":  # a server tool paused: let it go on
                    continue
                uses = [b for b in content if b.get("type") == "tool_use"]
                if not uses:
                    text = "\n".join(b.get("text", "") for b in content if b.get("type") == "text").strip()
                    if final_text_ends and text:
                        ep.result = text
                        break
                    reply = [{"type": "text", "text": f"Use the tools; end the episode with {finish_name}."}]
                else:
                    reply, done = self._run_tools(uses, handlers, finish_name, finish_fn)
                    if done is not None:
                        ep.result, ep.failure = done
                        break
                left = self.max_turns - turn
                if 0 < left <= 2:
                    reply.append({"type": "text", "text": f"({left} turn{'s' if left > 1 else ''} left: "
                                                          f"call {finish_name} now with your best work)"})
                messages.append({"role": "user", "content": reply})
                transcript.write({"type": "message", "role": "user", "content": reply})
            else:
                ep.failure = f"no {finish_name} within {self.max_turns} turns"
        except _ApiFailure as exc:
            ep.failure = str(exc)
        ep.cost = round(ep.cost, 10)
        transcript.write({"type": "end", "failure": ep.failure, "cost_usd": ep.cost, "usage": ep.usage})
        return ep

    def _run_tools(self, uses: list[dict], handlers: dict, finish_name: str, finish_fn: Callable):
        """Results of the tool calls of one assistant turn; `done` is (result, failure) once the
        finish tool was called (the calls after it are not run)."""
        results = []
        for use in uses:
            name, args = use.get("name"), use.get("input") or {}
            if name == finish_name:
                result, failure = finish_fn(args)
                return results, (result, failure)
            try:
                if name not in handlers:
                    raise ToolError(f"there is no tool '{name}'")
                text, is_error = handlers[name](args), False
            except ToolError as exc:
                text, is_error = str(exc), True
            if len(text) > MAX_TOOL_RESULT_CHARS:
                text = text[:MAX_TOOL_RESULT_CHARS] + f"\n... (cut at {MAX_TOOL_RESULT_CHARS} characters)"
            results.append({"type": "tool_result", "tool_use_id": use.get("id"), "content": text,
                            "is_error": is_error})
        return results, None

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
        if ctx.profile is None:
            raise ToolError("no profile is available for this harness")
        key = tree_hash(Path(ctx.incumbent_tree), editable_files(Path(ctx.incumbent_tree), ctx.editable))
        if key not in self._profiles:
            try:
                self._profiles[key] = ctx.profile() or "(the harness gives no profile)"
            except LabError as exc:
                raise ToolError(f"profiling failed: {exc}") from None
        return self._profiles[key]

    def _profile_or_note(self, ctx: AgentContext) -> str:
        try:
            return self._profile(ctx)
        except ToolError as exc:
            return f"({exc})"

    # --- the API ----------------------------------------------------------------------------
    def _call(self, system: list[dict], tools: list[dict], messages: list[dict]):
        """One Messages API call (the SDK retries 429/5xx/529); cache breakpoints on the system
        prompt (with the tools before it) and on the conversation up to its last user turn."""
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        sent = list(messages)
        sent[last_user] = copy.deepcopy(messages[last_user])
        sent[last_user]["content"][-1]["cache_control"] = {"type": "ephemeral"}
        try:
            return self._client.messages.create(model=self.model, max_tokens=self.max_tokens,
                                                system=system, tools=tools, messages=sent)
        except self._sdk.APIError as exc:
            raise self._classify(exc) from None

    def _classify(self, exc) -> Exception:
        """AgentFatal for what no retry can fix; _ApiFailure (this proposal fails) otherwise."""
        sdk = self._sdk
        status = getattr(exc, "status_code", None)
        detail = self._redact(_error_detail(exc))
        if isinstance(exc, sdk.AuthenticationError):
            return AgentFatal(f"the Anthropic API refused the key (401: {detail}); check ANTHROPIC_API_KEY")
        if status == 402 or any(m in detail.lower() for m in SPEND_MARKERS):
            return AgentFatal(f"the Anthropic account may not spend more ({status}: {detail}); add credit "
                              "or raise its spend limit, then continue with `lab run --resume RUN`")
        if isinstance(exc, sdk.PermissionDeniedError):
            return AgentFatal(f"the key may not use the model '{self.model}' (403: {detail})")
        if isinstance(exc, sdk.NotFoundError):
            return AgentFatal(f"the model '{self.model}' was not found (404: {detail}); pick another with --agent-model")
        if status is not None:
            return _ApiFailure(f"api error: {status} {detail}")
        return _ApiFailure(f"api error: {type(exc).__name__}: {detail}")

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text


class _ApiFailure(Exception):
    pass


class _Episode:
    def __init__(self):
        self.usage: dict = {k: 0 for k in USAGE_KEYS}
        self.cost = 0.0
        self.result = None
        self.failure = ""

    @property
    def tokens(self) -> int:
        return sum(self.usage[k] for k in USAGE_KEYS)

    def add(self, usage: dict, cost: float) -> None:
        for k, v in usage.items():
            self.usage[k] = self.usage.get(k, 0) + v
        self.cost += cost


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


def _references(root: Path) -> str:
    """The harness's references/ folder, inlined up to MAX_REFERENCE_CHARS (the rest listed)."""
    folder = root / "references"
    if not folder.is_dir():
        return "(this harness has no references/ folder)"
    parts, size = [], 0
    for rel in _walk(folder):
        path = folder / rel
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
