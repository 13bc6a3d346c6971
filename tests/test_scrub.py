"""The scrubber (lab/scrub.py) and where it is applied: the store's writers."""

import json

from lab.scrub import REDACTED, scrub, scrub_data
from lab.store import RunFolder, atomic_write

PREFIX = "sk-" + "ant-"  # assembled at run time: no key-shaped literal in the repository
KEY = PREFIX + "api03-" + "Abc_-1" * 8


def test_the_key_by_value_and_anything_shaped_like_one(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "plain-secret-value")
    monkeypatch.setenv("SHORT_KEY", "1")  # too short to be a secret: never redacts ordinary text
    text = f"error: {KEY} and {PREFIX}other-key-99 and plain-secret-value, 1 thing"
    assert scrub(text) == f"error: {REDACTED} and {REDACTED} and {REDACTED}, 1 thing"
    assert scrub_data({"a": [text], KEY: 3}) == {"a": [scrub(text)], REDACTED: 3}


def test_store_writers_scrub(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    folder = RunFolder.create(tmp_path, "r1", {"harness": "cdot"})
    folder.write_ledger(1, f"+ // {KEY}\n", {"hypothesis": f"uses {KEY}"})
    folder.append("proposed", number=1, hypothesis=f"key {KEY} {PREFIX}x")
    folder.append("evaluated", number=1, description=KEY, verdict={"status": "FAIL", "reason": KEY})
    folder.render()
    atomic_write(tmp_path / "record.json", json.dumps({"reason": KEY}))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert KEY not in text and PREFIX not in text, path
    assert folder.events()[0]["hypothesis"] == f"key {REDACTED} {REDACTED}"
