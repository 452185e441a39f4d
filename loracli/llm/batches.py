"""Encoded examples → deterministic micro-batches of tensors.

A *unit* is what one row of a batch holds: one example, or with packing several short examples
laid end to end. Micro-batch `i` is a pure function of (seed, i): the units of epoch `e` are
visited in a permutation drawn from `numpy.random.default_rng([seed, e])`, so a resumed run reads
exactly the batches the uninterrupted run would have. With `group_by_length` (the default) the
permutation is cut into chunks of 16 batches, each chunk sorted by length before it is split
into batches, and the batches shuffled again (the longest first, so running out of memory shows
at once): rows of a batch have similar lengths and little time goes into padding.

Padding is masked by position (the attention mask and the -100 targets past each row's length),
never by comparing ids with the pad id: when pad == eos the answer's eos is still learned.
Packed rows carry per-example `position_ids` that restart at 0 and no attention mask:
transformers then builds a block-diagonal causal mask from the position ids, so no example
attends to another one (checked against the unpacked logits in the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loracli.llm.templates import Encoded

GROUP_CHUNK = 16  # batches per length-sorted chunk (like transformers' LengthGroupedSampler)


def pack(encoded: list[Encoded], max_length: int) -> list[list[int]]:
    """Greedy first-fit, in order: lists of example indices whose lengths sum ≤ max_length."""
    units: list[list[int]] = []
    room: list[int] = []
    for i, e in enumerate(encoded):
        n = len(e.ids)
        for u, free in enumerate(room):
            if n <= free:
                units[u].append(i)
                room[u] -= n
                break
        else:
            units.append([i])
            room.append(max_length - n)
    return units


def collate(rows: list[list[Encoded]], pad_id: int, packed: bool) -> dict:
    """Rows of examples → input_ids, position_ids, targets (and attention_mask when padded)."""
    import torch

    width = max(sum(len(e.ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.ids)
            ids[r, at:at + n] = torch.tensor(e.ids)
            targets[r, at:at + n] = torch.tensor(e.targets)
            positions[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
        # padding in a packed row: positions restart too, so it is a block of its own
        positions[r, at:] = torch.arange(width - at)
    batch = {"input_ids": ids, "position_ids": positions, "targets": targets}
    batch["attention_mask"] = None if packed else mask
    return batch


@dataclass
class Plan:
    """Which units micro-batch `i` holds, and its tensors."""

    encoded: list[Encoded]
    batch_size: int
    seed: int
    pad_id: int
    packing: bool = False
    max_length: int = 1024
    group_by_length: bool = True

    def __post_init__(self):
        self.units = (pack(self.encoded, self.max_length) if self.packing
                      else [[i] for i in range(len(self.encoded))])
        self.per_epoch = math.ceil(len(self.units) / self.batch_size)
        self.lengths = [sum(len(self.encoded[i].ids) for i in u) for u in self.units]
        self.trained = [sum(t != -100 for t in e.targets) for e in self.encoded]
        self._order: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        """The units of each micro-batch of `epoch`, in order."""
        import numpy as np

        rng = np.random.default_rng([self.seed, epoch])
        order, b = rng.permutation(len(self.units)).tolist(), self.batch_size
        if not self.group_by_length:
            return [order[i:i + b] for i in range(0, len(order), b)]
        chunk, out = b * GROUP_CHUNK, []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda u: -self.lengths[u])
            out += [part[i:i + b] for i in range(0, len(part), b)]
        out = [out[i] for i in rng.permutation(len(out)).tolist()]
        longest = max(range(len(out)), key=lambda i: max(self.lengths[u] for u in out[i]))
        out.insert(0, out.pop(longest))
        return out

    def position(self, micro: int) -> tuple[int, int]:
        return divmod(micro, self.per_epoch)

    def units_of(self, micro: int) -> list[list[int]]:
        epoch, index = self.position(micro)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self._batches(epoch))
        return [self.units[u] for u in self._order[1][index]]

    def __call__(self, micro: int) -> dict:
        rows = [[self.encoded[i] for i in unit] for unit in self.units_of(micro)]
        return collate(rows, self.pad_id, self.packing)

    def count(self, micro: int) -> int:
        """Trained target tokens in micro-batch `micro` (without building its tensors)."""
        return sum(self.trained[i] for unit in self.units_of(micro) for i in unit)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.encoded)


def fixed(encoded: list[Encoded], batch_size: int, pad_id: int) -> list[dict]:
    """Batches in data order (for held-out loss): every example exactly once, padded."""
    return [collate([[e] for e in encoded[i:i + batch_size]], pad_id, packed=False)
            for i in range(0, len(encoded), batch_size)]
