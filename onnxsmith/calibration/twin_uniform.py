"""PTQ4ViT twin-uniform quantization: reference semantics, dual-GEMM split and scale search (numpy only).

A k-bit twin-uniform quantizer spends the most significant bit on choosing one of two ranges, R1 and R2, and
the remaining k-1 bits on a uniform level inside it. The steps satisfy ``delta_r2 == 2**m * delta_r1`` for
an integer ``m >= 0``. Two layouts (see the PTQ4ViT section of ``METHODS.md``):

* ``"softmax"`` (post-Softmax values in [0, 1]): ``x < split`` with ``split = 2**(k-1) * delta_r1`` uses
  levels ``0 .. 2**(k-1)-1`` of ``delta_r1``; every other value uses levels ``0 .. 2**(k-1)-1`` of
  ``delta_r2`` (normally ``1 / 2**(k-1)``, so R2 = [0, 1]).
* ``"gelu"`` (post-GELU values): ``x < 0`` uses levels ``-2**(k-1) .. 0`` of ``delta_r1`` (R1 covers GELU's
  minimum :data:`GELU_MIN`); every other value uses levels ``0 .. 2**(k-1)-1`` of ``delta_r2``.

Each branch is an ONNX-exact uniform quantization with zero point 0 (:func:`~onnxsmith.calibration.qparams.quantize`
/ :func:`~onnxsmith.calibration.qparams.dequantize`: float32 division, round half to even) whose integer
result is clipped to the k-bit level range. No offset is added to any value: PTQ4ViT's official simulated
quantizer adds about ``split`` to every value, a known bug not reproduced here.

ONNX expression of the k-bit clip. The levels of a branch are a sub-range of an 8-bit type (uint8 for
``0 .. 2**(k-1)-1``, int8 for ``-2**(k-1) .. 0``) that QuantizeLinear's saturation does not reach in general
(e.g. k = 8 softmax levels stop at 127 inside uint8's 255). The rewrite expresses the clip as a float
``Clip(x, qmin * scale, qmax * scale)`` (bounds from :meth:`UniformRange.clip_bounds`, float32) placed
*before* ``QuantizeLinear -> DequantizeLinear``; the Q/DQ pair stays adjacent, so onnxruntime's QDQ fusion
still sees a plain 8-bit tensor. This is bit-identical to clipping the integers: ``x -> rint(x / scale)``
(correctly rounded float32 division, then rint) is monotone non-decreasing and maps each float32 bound
``fl(q * scale)`` back to exactly ``q`` (relative error below ``2**-22`` for ``|q| <= 128``), so clipping
commutes with quantization.

Dual-GEMM form: :func:`split_parts` returns ``X = X_R1 + X_R2`` with each part a plain uniform fake-quantized
tensor, so ``X @ W == X_R1 @ W + X_R2 @ W`` with two integer GEMMs sharing W's quantization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from onnxsmith.calibration.metrics import mse
from onnxsmith.calibration.qparams import dequantize, quantize

Layout = Literal["softmax", "gelu"]
Metric = Callable[[np.ndarray, np.ndarray], float]

LAYOUTS: tuple[str, ...] = ("softmax", "gelu")
# Minimum of the exact (erf) GELU, x * Phi(x), reached at x ~ -0.75179; R1 of the gelu layout covers it.
GELU_MIN = -0.16997120747990369
MAX_BITS = 8  # every level range of a k <= 8 twin quantizer fits an 8-bit ONNX tensor


class UniformRange(NamedTuple):
    """One branch of a twin quantizer: levels ``qmin .. qmax`` of step ``scale`` (zero point 0) in ``dtype``."""

    scale: np.float32
    qmin: int
    qmax: int
    dtype: np.dtype

    def clip_bounds(self) -> tuple[np.float32, np.float32]:
        """Float32 ``(qmin * scale, qmax * scale)``: the ONNX ``Clip`` bounds placed before QuantizeLinear.

        Quantizing ``Clip(x, lo, hi)`` gives exactly the integers of quantizing ``x`` clipped to
        ``[qmin, qmax]`` (see the module docstring).
        """
        return np.float32(self.qmin) * self.scale, np.float32(self.qmax) * self.scale

    def fake_quantize(self, x: ArrayLike) -> np.ndarray:
        """``DQ(clip(Q(x), qmin, qmax))`` with ONNX QuantizeLinear/DequantizeLinear arithmetic; float32 out."""
        q = np.clip(quantize(x, self.scale, self.dtype.type(0), self.dtype), self.qmin, self.qmax)
        return dequantize(q.astype(self.dtype), self.scale, self.dtype.type(0))


@dataclass(frozen=True)
class TwinParams:
    """Parameters of a ``bits``-bit twin-uniform quantizer for one tensor.

    ``delta_r1`` and ``delta_r2`` are rounded to float32 on construction (the scales ONNX stores). Raises
    ValueError unless ``2 <= bits <= 8``, ``layout`` is ``"softmax"`` or ``"gelu"``, both deltas are finite
    and > 0 in float32, and ``delta_r2 == 2**m * delta_r1`` exactly for an integer ``m >= 0``.
    """

    bits: int
    delta_r1: float
    delta_r2: float
    layout: Layout

    def __post_init__(self) -> None:
        if not isinstance(self.bits, (int, np.integer)) or not 2 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in [2, {MAX_BITS}], got {self.bits!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("delta_r1", "delta_r2"):
            value = np.float32(getattr(self, name))
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0 in float32, got {getattr(self, name)!r}")
            object.__setattr__(self, name, float(value))
        ratio = self.delta_r2 / self.delta_r1  # float64 quotient of float32 values: exact for a power of two
        m = int(np.round(np.log2(ratio)))
        if m < 0 or np.ldexp(np.float32(self.delta_r1), m) != np.float32(self.delta_r2):
            raise ValueError(
                f"delta_r2 must equal 2**m * delta_r1 for an integer m >= 0; "
                f"got delta_r2 / delta_r1 = {ratio!r} (delta_r1={self.delta_r1!r}, delta_r2={self.delta_r2!r})"
            )

    @property
    def m(self) -> int:
        """The exponent ``m >= 0`` with ``delta_r2 == 2**m * delta_r1``."""
        return int(np.round(np.log2(self.delta_r2 / self.delta_r1)))

    @property
    def split(self) -> float:
        """Where R1 ends: values ``x < split`` use R1. softmax: ``2**(bits-1) * delta_r1``; gelu: 0."""
        if self.layout == "softmax":
            return float(np.float32(2 ** (self.bits - 1)) * np.float32(self.delta_r1))
        return 0.0

    @property
    def r1(self) -> UniformRange:
        """R1's branch: uint8 levels ``0 .. 2**(k-1)-1`` (softmax) or int8 ``-2**(k-1) .. 0`` (gelu)."""
        half = 2 ** (self.bits - 1)
        if self.layout == "softmax":
            return UniformRange(np.float32(self.delta_r1), 0, half - 1, np.dtype(np.uint8))
        return UniformRange(np.float32(self.delta_r1), -half, 0, np.dtype(np.int8))

    @property
    def r2(self) -> UniformRange:
        """R2's branch: uint8 levels ``0 .. 2**(k-1)-1`` of ``delta_r2`` (both layouts)."""
        return UniformRange(np.float32(self.delta_r2), 0, 2 ** (self.bits - 1) - 1, np.dtype(np.uint8))


def twin_fake_quantize(x: ArrayLike, params: TwinParams) -> np.ndarray:
    """Twin-uniform fake quantization: ``Where(x < split, DQ(Q_R1(x)), DQ(Q_R2(x)))``, float32 in and out.

    Each branch is :meth:`UniformRange.fake_quantize` of the whole tensor (ONNX-exact, k-bit clipped); no
    offset is added. For the gelu layout this equals the sum form
    ``clamp(rint(x/d2), 0, 2**(k-1)-1)*d2 + clamp(rint(x/d1), -2**(k-1), 0)*d1``. NaN inputs are not supported.
    """
    x = np.asarray(x, dtype=np.float32)
    return np.where(x < np.float32(params.split), params.r1.fake_quantize(x), params.r2.fake_quantize(x))


def split_parts(x: ArrayLike, params: TwinParams) -> tuple[np.ndarray, np.ndarray]:
    """The dual-GEMM decomposition ``(X_R1, X_R2)`` of :func:`twin_fake_quantize`.

    ``X_R1 = R1-fake-quantize(Where(x < split, x, 0))`` and ``X_R2 = R2-fake-quantize(Where(x < split, 0, x))``:
    each is a plain uniform QDQ tensor on its own grid (zero point 0, so the masked entries are exactly 0),
    and ``X_R1 + X_R2 == twin_fake_quantize(x, params)`` exactly (one addend is always 0).
    """
    x = np.asarray(x, dtype=np.float32)
    in_r1 = x < np.float32(params.split)
    zero = np.float32(0)
    return params.r1.fake_quantize(np.where(in_r1, x, zero)), params.r2.fake_quantize(np.where(in_r1, zero, x))


def initial_delta(x_absmax: float, bits: int) -> float:
    """PTQ4ViT's initial step ``x_absmax / (2**(bits-1) - 0.5)``; needs finite ``x_absmax > 0``, ``bits >= 2``."""
    if not (np.isfinite(x_absmax) and x_absmax > 0):
        raise ValueError(f"x_absmax must be finite and > 0, got {x_absmax!r}")
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    return float(x_absmax) / (2 ** (bits - 1) - 0.5)


def search_grid(delta0: float, alpha: float = 0.01, beta: float = 1.2, n: int = 100) -> np.ndarray:
    """The n + 1 candidates ``delta0 * (alpha + i * (beta - alpha) / n)``, i = 0..n, as float32 (ascending).

    Needs ``delta0 > 0``, ``0 < alpha <= beta`` and ``n >= 1``.
    """
    if not (np.isfinite(delta0) and delta0 > 0):
        raise ValueError(f"delta0 must be finite and > 0, got {delta0!r}")
    if not 0 < alpha <= beta or n < 1:
        raise ValueError(f"need 0 < alpha <= beta and n >= 1, got alpha={alpha}, beta={beta}, n={n}")
    return (delta0 * (alpha + np.arange(n + 1) * (beta - alpha) / n)).astype(np.float32)


def softmax_r1_candidates(bits: int) -> np.ndarray:
    """The softmax layout's R1 steps ``1/2**bits, 1/2**(bits+1), ..., 1/2**(bits+10)`` (float32, descending)."""
    return np.ldexp(np.float32(1), -(bits + np.arange(11))).astype(np.float32)


def gelu_r1_delta(delta_r2: float, bits: int) -> float:
    """R1's step for the gelu layout given R2's: ``delta_r2 / 2**m`` with the largest ``m >= 0`` that still
    covers GELU's minimum, ``2**(bits-1) * delta_r1 >= |GELU_MIN|`` (the finest R1 step reaching it).

    If even ``m = 0`` does not cover it (``2**(bits-1) * delta_r2 < |GELU_MIN|``) the result is ``delta_r2``
    itself (``m = 0``, the constraint forbids a coarser R1); negatives below ``-2**(bits-1) * delta_r2`` then
    saturate. The result is exact in float32.
    """
    d2 = np.float32(delta_r2)
    reach = np.float32(2 ** (bits - 1)) * d2
    m = 0
    while float(np.ldexp(reach, -(m + 1))) >= -GELU_MIN:
        m += 1
    return float(np.ldexp(d2, -m))


def search_twin(
    x_samples: ArrayLike,
    layout: Layout,
    bits: int,
    metric: Metric = mse,
    candidates: ArrayLike | None = None,
) -> TwinParams:
    """The twin parameters minimising ``metric(x, twin_fake_quantize(x, params))`` over one searched step.

    softmax: ``delta_r2 = 1/2**(bits-1)`` fixed; ``delta_r1`` runs over ``candidates``, by default
    :func:`softmax_r1_candidates`, each of which must make ``delta_r2 / delta_r1`` a power of two >= 1.
    gelu: ``delta_r2`` runs over ``candidates``, by default ``search_grid(initial_delta(max(x), bits))``
    (needs a positive sample), with ``delta_r1 = gelu_r1_delta(delta_r2, bits)``.
    Ties go to the earliest candidate. ``metric(reference, quantized)`` gets float32 arrays of ``x``'s shape.
    """
    x = np.asarray(x_samples, dtype=np.float32)
    if layout == "softmax":
        steps = softmax_r1_candidates(bits) if candidates is None else candidates
        delta_r2 = 1.0 / 2 ** (bits - 1)
        options = [TwinParams(bits, float(d), delta_r2, "softmax") for d in np.asarray(steps).ravel()]
    elif layout == "gelu":
        if candidates is None:
            top = float(x.max(initial=0.0))
            if top <= 0:
                raise ValueError("the gelu search needs at least one positive sample to set its grid")
            candidates = search_grid(initial_delta(top, bits))
        options = [TwinParams(bits, gelu_r1_delta(d, bits), float(d), "gelu") for d in np.asarray(candidates).ravel()]
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not options:
        raise ValueError("no candidates to search")
    scores = [metric(x, twin_fake_quantize(x, params)) for params in options]
    return options[int(np.argmin(scores))]
