"""The one scrubber of every text the lab writes that came from an agent or a candidate.

A hypothesis, a patch, a reason, a build log, a check line or a whole record may hold the API key:
an agent may paste it, and candidate code that once read it (from the environment, from
`/proc/<pid>/environ`) may put it in an error message. The sandbox keeps the key out of reach;
this is the second line: the store's writers (`store.atomic_write`, `RunFolder.append`) and the
lab's record writer pass every text through `scrub`, so no file the lab writes holds the key's
value or anything shaped like an Anthropic key (`sk-ant-...`).
"""

from __future__ import annotations

import os
import re

REDACTED = "[redacted]"
# Names of environment variables whose values are secrets; the same markers keep them out of every
# runner's environment (lab/envs/native.py, lab/envs/docker.py).
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
MIN_SECRET_CHARS = 8  # shorter values (a flag, "1") would redact ordinary text
_KEY_SHAPE = re.compile(r"sk-ant-[A-Za-z0-9_\-]*")


def secret_values(environ=None) -> list[str]:
    """Values of the secret-looking variables of `environ` (default: this process's), longest first."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items()
              if any(m in k.upper() for m in SECRET_MARKERS) and len(v) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` without any secret value of the environment and without any `sk-ant-` string."""
    if not text:
        return text
    for value in secret_values():
        if value in text:
            text = text.replace(value, REDACTED)
    return _KEY_SHAPE.sub(REDACTED, text)


def scrub_data(value):
    """`scrub` applied to every string inside a JSON-like value (keys included)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_data(k): scrub_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_data(v) for v in value]
    return value
