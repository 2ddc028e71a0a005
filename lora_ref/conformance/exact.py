"""Exact arithmetic for the conformance oracle: dyadic integer tensors and exact rationals.

Every finite float (float64 down to bfloat16) is a dyadic rational m·2^e. A :class:`Dyadic`
tensor stores integers N (NumPy object arrays of Python ints) and one exponent E, meaning
N·2^-E. Sums and products of dyadics are exact, so a matmul of the case inputs is evaluated
with no rounding at all; the scale s = alpha/r (a rational) and the irrational alpha/sqrt(r)
or DoRA norms enter only at the end, elementwise, as :class:`fractions.Fraction` (square roots
to 2^-200 relative error). The final conversion ``float(Fraction)`` is correctly rounded, so
the stored float64 oracle is the exact result rounded once, independent of BLAS, thread
count, CPU and evaluation order: regenerating the cases is bit-for-bit reproducible.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ..errors import NonFiniteError

#: Relative accuracy of :func:`sqrt_fraction` (far below float64's 2^-53).
SQRT_BITS = 200


class Dyadic:
    """An exact tensor N·2^-E with N an object array of Python ints."""

    __slots__ = ("ints", "exp")

    def __init__(self, ints: np.ndarray, exp: int) -> None:
        self.ints = ints
        self.exp = exp

    @classmethod
    def of(cls, array: np.ndarray, *, what: str = "tensor") -> Dyadic:
        """The exact value of a float array (any supported dtype); NaN/inf are refused."""
        wide = np.asarray(array, dtype=np.float64)
        if not np.all(np.isfinite(wide)):
            raise NonFiniteError(f"{what}: the exact oracle needs finite values")
        values = [Fraction(v) for v in wide.reshape(-1).tolist()]
        # every denominator is a power of two: scale all by the largest one
        exp = max((v.denominator.bit_length() - 1 for v in values), default=0)
        flat = [v.numerator << (exp - (v.denominator.bit_length() - 1)) for v in values]
        return cls(_objects(flat, wide.shape), exp)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ints.shape

    def _aligned(self, other: Dyadic) -> tuple[np.ndarray, np.ndarray, int]:
        exp = max(self.exp, other.exp)
        return self.ints * (1 << (exp - self.exp)), other.ints * (1 << (exp - other.exp)), exp

    def __add__(self, other: Dyadic) -> Dyadic:
        a, b, exp = self._aligned(other)
        return Dyadic(a + b, exp)

    def __sub__(self, other: Dyadic) -> Dyadic:
        a, b, exp = self._aligned(other)
        return Dyadic(a - b, exp)

    def __mul__(self, other: Dyadic) -> Dyadic:
        return Dyadic(self.ints * other.ints, self.exp + other.exp)

    def __matmul__(self, other: Dyadic) -> Dyadic:
        if 0 in self.shape or 0 in other.shape:  # object matmul of empty operands gives 0-filled ints
            shape = np.broadcast_shapes(self.shape[:-2], other.shape[:-2]) + (self.shape[-2], other.shape[-1])
            return Dyadic(_objects([0] * int(np.prod(shape)), shape), self.exp + other.exp)
        return Dyadic(self.ints @ other.ints, self.exp + other.exp)

    @property
    def T(self) -> Dyadic:  # noqa: N802 - mirrors numpy
        return Dyadic(self.ints.T, self.exp)

    def reshape(self, *shape: int) -> Dyadic:
        return Dyadic(self.ints.reshape(*shape), self.exp)

    def __getitem__(self, index: object) -> Dyadic:
        return Dyadic(self.ints[index], self.exp)

    def abs(self) -> Dyadic:
        return Dyadic(np.abs(self.ints) if self.ints.size else self.ints, self.exp)

    def sum(self, axis: int) -> Dyadic:
        shape = self.shape[:axis] + self.shape[axis + 1 :]
        if self.shape[axis] == 0:
            return Dyadic(_objects([0] * int(np.prod(shape)), shape), self.exp)
        return Dyadic(self.ints.sum(axis=axis).reshape(shape), self.exp)

    def fractions(self) -> np.ndarray:
        """The exact values as an object array of Fractions."""
        denominator = 1 << self.exp
        return _objects([Fraction(int(n), denominator) for n in self.ints.reshape(-1).tolist()], self.shape)


def _objects(values: list, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out.reshape(shape)


def sqrt_fraction(value: Fraction) -> Fraction:
    """sqrt(value) for value >= 0, exact when value is a square of a rational, else to 2^-SQRT_BITS."""
    if value < 0:
        raise ValueError("square root of a negative number")
    if value == 0:
        return Fraction(0)
    num, den = value.numerator, value.denominator
    root_num, root_den = math.isqrt(num), math.isqrt(den)
    if root_num * root_num == num and root_den * root_den == den:
        return Fraction(root_num, root_den)
    # scale so the integer square root carries SQRT_BITS significant bits
    shift = max(0, SQRT_BITS - (num.bit_length() - den.bit_length()) // 2 + 2)
    return Fraction(math.isqrt((num << (2 * shift)) // den), 1 << shift)


def combine(terms: list[tuple[Fraction, np.ndarray | Dyadic]], shape: tuple[int, ...]) -> np.ndarray:
    """Σ c_i · T_i elementwise, exactly, rounded once to float64 (c_i rational, T_i dyadic or Fraction arrays)."""
    total = _objects([Fraction(0)] * int(np.prod(shape, dtype=np.int64)), shape)
    for coefficient, tensor in terms:
        values = tensor.fractions() if isinstance(tensor, Dyadic) else tensor
        total = total + np.broadcast_to(values, shape) * coefficient
    return to_float64(total)


def to_float64(values: np.ndarray) -> np.ndarray:
    """Round an object array of Fractions (or ints) to float64, correctly (one rounding)."""
    flat = [float(v) for v in np.asarray(values, dtype=object).reshape(-1).tolist()]
    return np.array(flat, dtype=np.float64).reshape(np.shape(values))
