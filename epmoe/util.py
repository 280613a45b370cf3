"""Small integer helpers shared by the launch wrappers and the tuning code."""

from __future__ import annotations


def next_pow2(n: float) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    n = max(1, int(-(-n // 1)))  # ceil for floats, identity for ints
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)
