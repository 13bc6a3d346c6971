"""Where a side's buffers land can bias a comparison (an identical wavegru kernel loaded second
timed ~1.2% slower on an H200). The runner loads the two sides separately even for an A/A, and a
harness with rotate_placement reloads both every block, alternating which is allocated first."""

import random
import time

import pytest

from lab import stats
from lab.harness import Harness
from lab.records import Build, Sample
from lab.runner import PAIRS_PER_BLOCK, time_pairs


class PlacementHarness(Harness):
    """The first load after an unload gets the 'good' placement: 1.5% faster."""

    name = "placement"

    def __init__(self, rotate: bool):
        self.rotate_placement = rotate
        self.live = 0
        self.loads = 0
        self.rng = random.Random(1)

    def load(self, build):
        self.loads += 1
        self.live += 1
        return {"good": self.live == 1}

    def unload(self, loaded):
        self.live -= 1

    def sample(self, loaded, seed):
        t = 1.0 * (0.985 if loaded["good"] else 1.0) * (1 + self.rng.gauss(0, 0.002))
        return Sample(seconds=t, value=1 / t)


def _median_ratio(harness):
    build = Build(ok=True, source_hash="x", artifact="x")
    # a wide delta: the stop rule ends the timing at 40 pairs, whatever their spread
    pairs, _, _ = time_pairs(harness, build, build, seed=3, delta=0.2, min_pairs=40,
                             min_seconds=0, max_seconds=60)
    _, low, high = stats.median_ci(stats.log_ratios(pairs))
    return pairs, (low, high)


def test_an_a_a_loads_both_sides_and_placement_bias_shows_without_rotation():
    h = PlacementHarness(rotate=False)
    pairs, ci = _median_ratio(h)
    assert h.loads == 2 and h.live == 0  # two loads of one build, both unloaded
    assert ci[0] > 0.01  # the second-loaded side is slower: a false WORSE waiting to happen


def test_rotation_cancels_placement_bias():
    h = PlacementHarness(rotate=True)
    pairs, ci = _median_ratio(h)
    blocks = len(pairs) // PAIRS_PER_BLOCK
    assert blocks % 2 == 0 and h.loads == 2 * blocks and h.live == 0
    assert {p.loaded_first for p in pairs} == {"A", "B"}
    assert sum(p.loaded_first == "A" for p in pairs) == sum(p.loaded_first == "B" for p in pairs)
    assert ci[0] < 0 < ci[1]  # identical sides: no effect left


class SlowHarness(PlacementHarness):
    """Every sample takes 50 ms of wall time."""

    def sample(self, loaded, seed):
        time.sleep(0.05)
        return Sample(seconds=0.05, value=20.0)


@pytest.mark.parametrize("rotate", [False, True])
def test_a_spent_budget_ends_the_block_once_the_minimum_pairs_are_there(rotate):
    """Slow samples (llama.cpp on a CPU: ~8 s a pair) would overrun the budget by a whole block;
    the block ends at the first pair past the budget with the minimum reached, in a B-first block
    for a rotating harness."""
    build = Build(ok=True, source_hash="x", artifact="x")
    # (a rotating harness: its A-first block whole, then one pair of the B-first one)
    pairs, _, _ = time_pairs(SlowHarness(rotate), build, build, seed=3, delta=0.01, min_pairs=2,
                                   min_seconds=0, max_seconds=0.15)
    assert len(pairs) == (PAIRS_PER_BLOCK + 1 if rotate else 2)
    assert pairs[-1].loaded_first == ("B" if rotate else "A")
