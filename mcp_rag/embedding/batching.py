"""Batches of passages for a local encoder, grouped so that padding does not multiply the work.

A batch is padded to its longest text, so a long chunk and a short one embedded together cost two
long ones: measured here with the int8 default model, a document's two chunks (a full 256-token one
and its short tail) took 2.2x the CPU batched together than one at a time, while batching texts of
equal length saved nothing on CPU. ``length_batches`` therefore groups texts of similar length
(longest first) and starts a new batch as soon as padding would add more than ``slack`` of the real
work.
"""

from __future__ import annotations

from collections.abc import Sequence

PADDING_SLACK = 1.2
"""A batch's padded size may exceed the sum of its texts' sizes by at most this factor."""


def length_batches(lengths: Sequence[int], batch_size: int, slack: float = PADDING_SLACK) -> list[list[int]]:
    """The indices of ``lengths`` in batches of at most ``batch_size`` whose padded size (count times
    the longest) stays within ``slack`` times their total size; every index appears exactly once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        size = max(lengths[i], 1)
        if current:
            longest = max(lengths[current[0]], 1)
            if len(current) >= batch_size or (len(current) + 1) * longest > slack * (total + size):
                batches.append(current)
                current, total = [], 0
        current.append(i)
        total += size
    if current:
        batches.append(current)
    return batches
