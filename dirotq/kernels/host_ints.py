"""Integer arithmetic for the kernels' host code (grids, block sizes, split counts).

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions (Triton 3.6 and later): called
from Python they first unwrap every argument, about 5 µs a call on a 2-core host. A W4A4 layer call
made 14 of them, half of its own host time; these are the same integers in plain Python."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n, for n ≥ 1 (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
