"""The verified cache (lab/cache.py): every read re-hashes, a mismatch is evicted, logged, remade."""

import json
import os

import pytest

from lab.cache import MANIFEST_SUFFIX, fetch


def _maker(calls, payload=b"artifact"):
    def make(folder):
        calls.append(folder)
        (folder / "bin").mkdir()
        (folder / "bin" / "tool").write_bytes(payload)
        return {"made": len(calls)}
    return make


def test_made_once_then_read_verified(tmp_path):
    calls = []
    first = fetch(tmp_path, "k1", _maker(calls))
    again = fetch(tmp_path, "k1", _maker(calls))
    assert len(calls) == 1 and not first.cached and again.cached
    assert again.meta == {"made": 1} and (again.path / "bin" / "tool").read_bytes() == b"artifact"
    assert not os.access(again.path / "bin" / "tool", os.W_OK) or os.geteuid() == 0  # written read-only
    assert (os.stat(again.path / "bin" / "tool").st_mode & 0o222) == 0


@pytest.mark.parametrize("tamper", ["change", "remove", "add", "symlink", "manifest", "digest"])
def test_any_change_is_evicted_logged_and_remade(tmp_path, tamper, capsys):
    calls = []
    entry = fetch(tmp_path, "k1", _maker(calls))
    tool = entry.path / "bin" / "tool"
    manifest = tmp_path / ("k1" + MANIFEST_SUFFIX)
    if tamper == "change":
        os.chmod(tool, 0o644)
        tool.write_bytes(b"slower artifact")
    elif tamper == "remove":
        os.chmod(tool, 0o644)
        tool.unlink()
    elif tamper == "add":
        (entry.path / "bin" / "extra.so").write_bytes(b"x")
    elif tamper == "symlink":
        os.chmod(tool, 0o644)
        tool.unlink()
        tool.symlink_to("/bin/true")
    elif tamper == "manifest":  # rewrite the manifest to match a changed file: its digest no longer holds
        os.chmod(tool, 0o644)
        tool.write_bytes(b"slower artifact")
        data = json.loads(manifest.read_text())
        data["files"]["bin/tool"] = "0" * 64
        manifest.write_text(json.dumps(data))
    elif tamper == "digest":
        manifest.write_text("not json")
    again = fetch(tmp_path, "k1", _maker(calls))
    assert len(calls) == 2 and not again.cached and again.evicted
    assert (again.path / "bin" / "tool").read_bytes() == b"artifact"
    log = (tmp_path / "evictions.log").read_text()
    assert "evicted" in log and "k1" in log
    assert "evicted" in capsys.readouterr().err
    assert fetch(tmp_path, "k1", _maker(calls)).cached  # the remade entry verifies


def test_nothing_cached_when_make_declines(tmp_path):
    calls = []
    assert fetch(tmp_path, "k1", lambda folder: calls.append(folder)) is None
    assert not (tmp_path / "k1").exists() and not list(tmp_path.glob(".k1.partial*"))
    assert fetch(tmp_path, "k1", _maker(calls)).meta == {"made": 2}


def test_a_failing_make_leaves_nothing(tmp_path):
    def make(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("toolchain broke")
    with pytest.raises(RuntimeError):
        fetch(tmp_path, "k1", make)
    assert not (tmp_path / "k1").exists() and not list(tmp_path.glob(".k1.partial*"))


def test_keys_cannot_leave_the_root(tmp_path):
    for key in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            fetch(tmp_path, key, _maker([]))
