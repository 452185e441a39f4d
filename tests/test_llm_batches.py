"""Micro-batch plans: every example once per epoch, deterministic, packed without overflow,
grouped by length to cut padding."""

from __future__ import annotations

import numpy as np

from loracli.llm import batches
from loracli.llm.templates import Encoded


def examples(n=100, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(4, 120))
        out.append(Encoded(tuple(range(length)), (False,) * (length // 2) +
                           (True,) * (length - length // 2), f"t:{i}"))
    return out


def padded(plan, epoch):
    per = plan.per_epoch
    total = 0
    for m in range(epoch * per, (epoch + 1) * per):
        rows = [sum(len(plan.encoded[i].ids) for i in unit) for unit in plan.units_of(m)]
        total += max(rows) * len(rows)
    return total


def test_every_unit_once_per_epoch_and_deterministic():
    enc = examples(101)
    for group in (True, False):
        plan = batches.Plan(enc, 8, seed=3, pad_id=0, group_by_length=group)
        assert plan.per_epoch == 13
        for epoch in (0, 1):
            seen = sorted(i for m in range(epoch * 13, epoch * 13 + 13)
                          for unit in plan.units_of(m) for i in unit)
            assert seen == list(range(101))
        again = batches.Plan(enc, 8, seed=3, pad_id=0, group_by_length=group)
        assert [again.units_of(m) for m in (20, 3, 0)] == [plan.units_of(m) for m in (20, 3, 0)]
        other = batches.Plan(enc, 8, seed=4, pad_id=0, group_by_length=group)
        assert other.units_of(0) != plan.units_of(0)


def test_grouping_by_length_cuts_padding_and_puts_the_longest_first():
    enc = examples(256)
    grouped = batches.Plan(enc, 8, seed=1, pad_id=0)
    plain = batches.Plan(enc, 8, seed=1, pad_id=0, group_by_length=False)
    real = sum(len(e.ids) for e in enc)
    assert padded(grouped, 0) < 0.8 * padded(plain, 0)
    assert padded(grouped, 0) >= real
    longest = max(len(e.ids) for e in enc)
    assert max(len(grouped.encoded[u[0]].ids) for u in grouped.units_of(0)) == longest


def test_count_is_the_trained_targets_of_the_micro_batch():
    enc = examples(20)
    plan = batches.Plan(enc, 4, seed=0, pad_id=0)
    for m in range(5):
        batch = plan(m)
        assert plan.count(m) == int((batch["targets"] != -100).sum())


def test_packing_fills_rows_without_overflow_and_keeps_every_example():
    enc = examples(60)
    units = batches.pack(enc, 128)
    assert sorted(i for u in units for i in u) == list(range(60))
    assert all(sum(len(enc[i].ids) for i in u) <= 128 for u in units)
    assert len(units) < 60
    b = batches.collate([[enc[i] for i in units[0]]], pad_id=0, packed=True)
    assert b["attention_mask"] is None
    starts = [int(x) for x in np.flatnonzero(b["position_ids"][0].numpy() == 0)]
    lengths = np.cumsum([0] + [len(enc[i].ids) for i in units[0]])[:-1].tolist()
    assert starts[:len(lengths)] == lengths  # positions restart at every example
