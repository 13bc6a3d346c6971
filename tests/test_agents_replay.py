"""Replay and manual agents, the factory, and the diff every agent's proposal comes from."""

import json
from pathlib import Path

import pytest

from lab.agents import AgentContext, make_agent
from lab.agents.manual import ManualAgent
from lab.agents.replay import ReplayAgent, load_replay
from lab.agents.tools import diff_trees
from lab.errors import LabError

from conftest import git_apply_in_copy

CDOT = Path(__file__).resolve().parent.parent / "examples" / "cdot"


def context(tmp_path, tried=()):
    return AgentContext(harness_name="cdot", harness_root=CDOT, incumbent_tree=CDOT, editable=("work.c",),
                        program_md="", results_tsv="", log_md="", recent_failures=[], run_dir=tmp_path / "run",
                        scratch=tmp_path / "scratch", tried_hypotheses=list(tried))


def test_replay_over_a_folder_in_sorted_order_then_exhausted(tmp_path):
    agent = make_agent(f"replay:{CDOT / 'solutions' / 'wrong'}")
    assert isinstance(agent, ReplayAgent)
    ctx = context(tmp_path)
    got = [agent.propose(ctx) for _ in range(4)]
    assert [p.hypothesis for p in got] == ["hang", "no-compile", "skip-half", "slower"]
    assert got[0].patch == (CDOT / "solutions" / "wrong" / "hang.patch").read_text()
    assert not agent.exhausted
    end = agent.propose(ctx)
    assert end.failure == "replay exhausted" and agent.exhausted


def test_replay_jsonl_with_inline_patches_and_patch_files(tmp_path):
    correct = (CDOT / "solutions" / "correct" / "two-accumulators.patch").read_text()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "one.patch").write_text("# accumulate in pairs\n" + correct)
    (tmp_path / "p" / "two.patch").write_text("From 0 Mon\nSubject: [PATCH 2/3] unroll the loop\n\n---\n" + correct)
    lines = [{"patch": correct, "hypothesis": "inline one"}, {"patch_file": "p/one.patch"},
             {"patch_file": "p/two.patch"}, {"patch_file": "p/one.patch", "hypothesis": "given"}, {"patch": correct}]
    source = tmp_path / "list.jsonl"
    source.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = load_replay(source)
    assert [i.hypothesis for i in items] == ["inline one", "accumulate in pairs", "unroll the loop", "given",
                                             "replay item 5"]
    assert items[1].patch.startswith("# accumulate in pairs\n")
    as_json = tmp_path / "list.json"
    as_json.write_text(json.dumps(lines))
    assert [i.hypothesis for i in load_replay(as_json)] == [i.hypothesis for i in items]


def test_a_resumed_replay_skips_what_was_proposed(tmp_path):
    agent = ReplayAgent.from_path(CDOT / "solutions" / "wrong")
    proposal = agent.propose(context(tmp_path, tried=["hang", "no-compile"]))
    assert proposal.hypothesis == "skip-half"


@pytest.mark.parametrize("content,words", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ('{"patch": "x"}', "list of items"),
    ('[{"hypothesis": "no patch"}]', "needs \"patch\""),
    ('[{"patch_file": "missing.patch"}]', "cannot read the patch"),
])
def test_replay_errors_say_what_is_wrong(tmp_path, content, words):
    source = tmp_path / "list.json"
    if content is not None:
        source.write_text(content)
    with pytest.raises(LabError, match=words):
        make_agent(f"replay:{source}")


def test_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(LabError, match="no \\*.patch"):
        make_agent(f"replay:{tmp_path}")


def test_manual_is_one_shot(tmp_path):
    patch = CDOT / "solutions" / "correct" / "two-accumulators.patch"
    agent = make_agent(f"manual:{patch}")
    assert isinstance(agent, ManualAgent)
    ctx = context(tmp_path, tried=["two-accumulators"])  # a person may retry an idea
    first = agent.propose(ctx)
    assert first.hypothesis == "two-accumulators" and first.patch == patch.read_text()
    assert agent.propose(ctx).failure == "replay exhausted" and agent.exhausted
    assert ManualAgent.from_file(patch, hypothesis="pairs\nof sums").propose(ctx).hypothesis == "pairs"


def test_unknown_specs_say_what_to_use():
    with pytest.raises(LabError, match="replay:FILE"):
        make_agent("gpt")
    with pytest.raises(LabError, match="needs a path"):
        make_agent("replay:")


def test_diff_covers_edits_new_and_deleted_files_and_missing_newlines(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    for tree in (before, after):
        (tree / "src" / "deep").mkdir(parents=True)
        (tree / "harness.py").write_text("locked\n")
    (before / "src" / "a.c").write_text("int a;\nint b;\n")
    (before / "src" / "gone.c").write_text("int gone;\n")
    (before / "src" / "tail.c").write_text("int t;")
    (after / "src" / "a.c").write_text("int a;\nint c;\n")
    (after / "src" / "deep" / "new.c").write_text("int n;")
    (after / "src" / "tail.c").write_text("int t;\nint u;")
    (after / "harness.py").write_text("tampered\n")  # not editable: never in the diff
    (after / "HYPOTHESIS").write_text("x\n")
    patch = diff_trees(before, after, ("src/**",), exclude=("HYPOTHESIS",))
    assert "harness.py" not in patch and "HYPOTHESIS" not in patch
    assert "new file mode" in patch and "deleted file mode" in patch and "\\ No newline at end of file" in patch
    applied = git_apply_in_copy(before, patch, tmp_path)
    for rel in ("src/a.c", "src/deep/new.c", "src/tail.c"):
        assert (applied / rel).read_text() == (after / rel).read_text()
    assert not (applied / "src" / "gone.c").exists()
    assert (applied / "harness.py").read_text() == "locked\n"
    assert diff_trees(before, before, ("src/**",)) == ""
