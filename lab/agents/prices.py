"""What a call to the Messages API costs: one price table per model id, in USD per million tokens.

The agent prices every response from its `usage` (input, output, 5-minute cache writes, cache
reads, web searches), so `spent_usd` and the loop's `--max-usd` see what the API bills. A model
with no price here is refused at start rather than counted as free; give its prices in a JSON file
through the environment variable LAB_PRICES (or `prices_file=`):

    {"claude-new-model": {"input": 3, "output": 15, "cache_write": 3.75, "cache_read": 0.3}}

Source of the table: the model pages and the pricing page of the Claude API documentation,
https://platform.claude.com/docs/en/about-claude/pricing and .../docs/en/models/<model>/overview,
read on 2026-11-22 (Sonnet 5.5 with its cache-read price of 2026-10-07). Web search:
$10 per 1,000 searches, same source. Cache writes are priced at the 5-minute rate: the agent
only asks for the default (5-minute) ephemeral cache.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabError

# The model the anthropic agent uses when --agent-model is not given: the documentation's recommended
# starting point for agentic coding as of 2026-11-22 (Claude Opus 5.5, released 2026-09-22).
DEFAULT_MODEL = "claude-opus-5-5"

WEB_SEARCH_USD_PER_1K = 10.0
PRICES_ENV = "LAB_PRICES"


@dataclass(frozen=True)
class Price:
    """USD per million tokens. `long_prompt` is (threshold, Price) for models whose whole request
    is billed at other rates once its prompt (input + cache writes + cache reads) exceeds it."""

    input: float
    output: float
    cache_write: float  # 5-minute ephemeral cache write
    cache_read: float
    long_prompt: tuple[int, "Price"] | None = None


PRICES: dict[str, Price] = {
    "claude-fable-5-1": Price(10.0, 50.0, 12.5, 0.25),
    "claude-fable-5": Price(10.0, 50.0, 12.5, 1.0),
    "claude-opus-5-5": Price(4.0, 20.0, 5.0, 0.20),
    "claude-opus-5": Price(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-8": Price(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-7": Price(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-6": Price(5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-5": Price(5.0, 25.0, 6.25, 0.50),
    "claude-sonnet-5-5": Price(2.0, 10.0, 2.5, 0.10),
    "claude-sonnet-5": Price(2.0, 10.0, 2.5, 0.20),
    "claude-sonnet-4-6": Price(3.0, 15.0, 3.75, 0.30),
    "claude-sonnet-4-5": Price(3.0, 15.0, 3.75, 0.30),
    "claude-haiku-5-5": Price(0.10, 0.50, 0.125, 0.01,
                              long_prompt=(100_000, Price(0.50, 2.50, 0.625, 0.05))),
    "claude-haiku-4-5": Price(1.0, 5.0, 1.25, 0.10),
}

_FIELDS = ("input", "output", "cache_write", "cache_read")
_SNAPSHOT = re.compile(r"-\d{8}$")  # claude-haiku-4-5-20251001 -> claude-haiku-4-5


def load_prices(prices_file: str | Path | None = None) -> dict[str, Price]:
    """The built-in table, updated by the JSON file `prices_file` or $LAB_PRICES if given."""
    table = dict(PRICES)
    path = prices_file or os.environ.get(PRICES_ENV)
    if not path:
        return table
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read the price file {path} ({exc}); it must be JSON like "
                       '{"MODEL": {"input": 3, "output": 15, "cache_write": 3.75, "cache_read": 0.3}}') from None
    if not isinstance(data, dict):
        raise LabError(f"the price file {path} must hold one object per model id")
    for model, entry in data.items():
        missing = [f for f in _FIELDS if not isinstance(entry, dict) or not isinstance(entry.get(f), (int, float))]
        if missing:
            raise LabError(f"the price file {path} gives no number for {', '.join(missing)} of '{model}' "
                           "(USD per million tokens)")
        table[model] = Price(*(float(entry[f]) for f in _FIELDS))  # type: ignore[arg-type]  # _FIELDS: the 4 rates
    return table


def price_for(model: str, table: dict[str, Price]) -> Price:
    """The price of `model` (a dated snapshot id falls back to its alias); LabError if unknown."""
    for key in (model, _SNAPSHOT.sub("", model)):
        if key in table:
            return table[key]
    raise LabError(
        f"no price is known for the model '{model}', so its spending cannot be tracked; give its "
        f"prices in a JSON file named by ${PRICES_ENV} (see lab/agents/prices.py) or pick a model "
        f"among: {', '.join(sorted(table))}"
    )


def cost_usd(usage: dict, price: Price) -> float:
    """The cost of one response from its usage counts (tokens by kind, web searches)."""
    inp = usage.get("input_tokens", 0) or 0
    write = usage.get("cache_creation_input_tokens", 0) or 0
    read = usage.get("cache_read_input_tokens", 0) or 0
    if price.long_prompt and inp + write + read > price.long_prompt[0]:
        price = price.long_prompt[1]
    tokens = (inp * price.input + (usage.get("output_tokens", 0) or 0) * price.output
              + write * price.cache_write + read * price.cache_read)
    searches = usage.get("web_search_requests", 0) or 0
    return tokens / 1e6 + searches * WEB_SEARCH_USD_PER_1K / 1000


# One proposal episode of the anthropic agent on wavegru (11 requests: edit, compile, check, views,
# profile, edit, compile, check, submit), as measured on the fake API by tests/test_agents_tokens.py
# (2026-12-02): the prompt sizes, at 4 characters a token, cache reads being the prefix shared with
# the previous request (88 % of the prompt). Output is an assumption, not a measurement: about
# 2,000 tokens of thinking and tool input a turn.
TYPICAL_EPISODE = {"input_tokens": 33, "cache_creation_input_tokens": 16_200, "cache_read_input_tokens": 119_600,
                   "output_tokens": 22_000}
EPISODES_PER_HOUR = 8  # an episode of a few minutes plus an evaluation of a few minutes (wavegru)


def estimate_run_usd(price: Price, budget_s: float, episodes_per_hour: float = EPISODES_PER_HOUR,
                     episode: dict | None = None) -> tuple[float, int]:
    """(dollars, episodes): what `budget_s` of proposals costs at `price`, at the typical episode."""
    episodes = max(1, round(budget_s / 3600 * episodes_per_hour))
    return cost_usd(episode or TYPICAL_EPISODE, price) * episodes, episodes
