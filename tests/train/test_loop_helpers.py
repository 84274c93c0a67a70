"""The training loop's pure parts: learning-rate schedule, epoch order, length-grouped batches."""

import math
import threading

import numpy as np
import pytest

from vcritic.train.loop import (
    ReadAhead,
    chunk_args,
    epoch_groups,
    epoch_seed,
    lr_factor,
    padding_counts,
    padding_fraction,
    plan_batches,
    total_optimizer_steps,
)


def test_warmup_then_cosine_to_the_floor():
    total, warmup, floor = 100, 10, 0.1
    f = [lr_factor(s, warmup, total, "cosine", floor) for s in range(total + 20)]
    assert f[0] == pytest.approx(0.1) and f[warmup - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:warmup], f[1:warmup], strict=False))  # warmup rises
    decay = f[warmup - 1 : total]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))  # then never rises
    assert f[total - 1] == pytest.approx(floor)  # the last step is at the floor...
    assert all(x == pytest.approx(floor) for x in f[total:])  # ...and it stays there
    midpoint = warmup - 1 + (total - warmup) // 2
    assert f[midpoint] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=0.02)


def test_constant_schedule_and_no_warmup():
    assert [lr_factor(s, 3, 10, "constant") for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    assert lr_factor(0, 0, 10, "cosine", 0.0) < 1.0 and lr_factor(9, 0, 10, "cosine", 0.0) == pytest.approx(0.0)
    assert lr_factor(5, 0, 1, "cosine", 0.2) == pytest.approx(0.2)  # a 1-step run is all floor
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(5, 0, 10, "linear")


def test_total_steps_count_what_the_loop_does():
    # 100 rows over 2 workers = 50 each; buffers of 256 hold all 50; ceil(50/4) = 13 micro-batches.
    assert total_optimizer_steps(100, 4, 1, 2, 20, None, 256) == 13 * 20
    # Accumulation counts micro-batches across epochs (DeepSpeed's own counter).
    assert total_optimizer_steps(100, 4, 4, 2, 3, None, 256) == (13 * 3) // 4
    # Each buffer is cut on its own: 50 rows in buffers of 16 → 16,16,16,2 → 4+4+4+1 micro-batches.
    assert total_optimizer_steps(100, 4, 1, 2, 1, None, 16) == 13
    assert total_optimizer_steps(100, 3, 1, 2, 1, None, 16) == 6 + 6 + 6 + 1
    assert total_optimizer_steps(100, 4, 1, 2, 5, 3, 256) == 15  # capped per epoch
    assert total_optimizer_steps(0, 4, 1, 2, 5) == 1


def test_epoch_seeds_differ_by_epoch_and_rank_and_repeat():
    seeds = {epoch_seed(0, e, r) for e in range(5) for r in range(4)}
    assert len(seeds) == 20
    assert epoch_seed(7, 3, 1) == epoch_seed(7, 3, 1) != epoch_seed(8, 3, 1)


def skewed_lengths(n=400, seed=0):
    """Mostly short rows, some very long ones (spoken critiques)."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.where(rng.random(n) < 0.7, rng.integers(40, 80, n), rng.integers(200, 600, n))]


def test_plan_covers_every_row_once_in_batches_of_the_size():
    lengths = skewed_lengths(103)
    for group in (False, True):
        batches = plan_batches(lengths, 8, group, np.random.default_rng(1))
        assert sorted(i for b in batches for i in b) == list(range(103))
        assert len(batches) == math.ceil(103 / 8) and all(len(b) == 8 for b in batches if len(b) != 103 % 8)


def test_grouping_by_length_cuts_padding_on_a_skewed_set():
    lengths = skewed_lengths()

    def fraction(group):
        return padding_fraction([[lengths[i] for i in b]
                                 for b in plan_batches(lengths, 8, group, np.random.default_rng(2))])

    random, grouped = fraction(False), fraction(True)
    assert grouped < random / 4, (random, grouped)
    assert 0.0 <= grouped < 0.1 < random < 1.0


def test_grouped_batch_order_is_shuffled():
    """Sorted within the buffer, but the batches do not run from short to long."""
    lengths = skewed_lengths()
    batches = plan_batches(lengths, 8, True, np.random.default_rng(3))
    firsts = [lengths[b[0]] for b in batches]
    assert firsts != sorted(firsts)


def test_padding_counts():
    assert padding_counts([[3, 1], [2]]) == (2, 8)
    assert padding_fraction([[3, 1], [2]]) == pytest.approx(0.25)
    assert padding_fraction([]) == 0.0


@pytest.fixture(scope="module")
def dataset(ray_local):
    lengths = skewed_lengths(60)
    return ray_local.data.from_items([{"id": i, "n": n} for i, n in enumerate(lengths)]).repartition(1)


def epoch_ids(dataset, seed, group=True, buffer=64):
    return [[r["id"] for r in b] for b in epoch_groups(dataset.iterator(), 4, buffer, group, seed, dict,
                                                       lambda r: r["n"])]


def test_each_epoch_has_its_own_order_and_a_seed_repeats_it(dataset):
    first, second = epoch_ids(dataset, epoch_seed(0, 0)), epoch_ids(dataset, epoch_seed(0, 1))
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(60))
    assert first != second
    assert epoch_ids(dataset, epoch_seed(0, 0)) == first
    # Without grouping too, and across buffer boundaries (buffers smaller than the shard).
    a, b = epoch_ids(dataset, 11, group=False, buffer=16), epoch_ids(dataset, 12, group=False, buffer=16)
    assert a != b and epoch_ids(dataset, 11, group=False, buffer=16) == a
    assert sorted(sum(a, [])) == list(range(60))
    assert len(a) == 4 + 4 + 4 + 3  # 60 rows in buffers of 16,16,16,12, batches of 4


def test_a_read_ahead_epoch_is_the_same_epoch(dataset):
    seed = epoch_seed(0, 3)
    ahead = ReadAhead(dataset.iterator(), **chunk_args(16, seed))
    via_ahead = [[r["id"] for r in b] for b in epoch_groups(ahead, 4, 16, True, seed, dict, lambda r: r["n"])]
    assert via_ahead == epoch_ids(dataset, seed, buffer=16)


class _Shard:
    """A shard whose first chunk waits for ``release``; records the thread that fetched it."""

    def __init__(self, fail: bool = False) -> None:
        self.release, self.fetched_by, self.fail = threading.Event(), None, fail

    def iter_batches(self, **_):
        self.release.wait(10)
        self.fetched_by = threading.current_thread().name
        if self.fail:
            raise OSError("read task lost")
        yield from ("chunk0", "chunk1")


def test_read_ahead_fetches_the_first_chunk_in_the_background_and_hands_on_errors():
    shard = _Shard()
    ahead = ReadAhead(shard, **chunk_args(8, 1))
    shard.release.set()  # the main thread is free while the chunk is read
    assert list(ahead.iter_batches(**chunk_args(8, 1))) == ["chunk0", "chunk1"]
    assert shard.fetched_by == "vcritic-read-ahead"
    with pytest.raises(ValueError, match="read ahead with"):
        next(ReadAhead(shard, **chunk_args(8, 1)).iter_batches(**chunk_args(8, 2)))  # another seed: another epoch
    failing = _Shard(fail=True)
    failing.release.set()
    with pytest.raises(OSError, match="read task lost"):
        list(ReadAhead(failing, **chunk_args(8, 1)).iter_batches(**chunk_args(8, 1)))
