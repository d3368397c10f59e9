"""YaRN RoPE scaling (Peng et al. 2023, arXiv 2309.00071), as DeepSeek-V2 and V3 use it: pure numbers, no Flax.

A model pretrained with context L0 (`original_max_len`) is extended by a factor s:

    inv_freq_i = interp_i * ramp_i + extrap_i * (1 - ramp_i),  i < P/2
    extrap_i   = theta^(-2i/P)          (the frequency as pretrained)
    interp_i   = extrap_i / s           (position interpolation)
    ramp_i     = clip((i - low) / (high - low), 0, 1)

with [low, high] the feature range whose wavelength is between L0 / beta_fast and L0 / beta_slow rotations:
dim(r) = P ln(L0 / (2 pi r)) / (2 ln theta), low = floor(dim(beta_fast)), high = ceil(dim(beta_slow)) (no
rounding when `truncate` is False), clipped to [0, P - 1]. Fast features (i < low) keep their frequency, slow
ones (i > high) are interpolated.

Two scales ride along, each as transformers 5.23.0 computes it (`modeling_rope_utils._compute_yarn_parameters`
and DeepSeek's `yarn_apply_mscale`), with m(s, a) = 0.1 a ln s + 1 for s > 1, else 1:
    attention_factor  multiplies RoPE's cos and sin (so the rotated features): the given `attention_factor`,
                      else m(s, mscale) / m(s, mscale_all_dim) when both are non-zero, else m(s, 1).
    softmax factor    multiplies the attention softmax scale 1 / sqrt(qk head width): m(s, mscale_all_dim)^2
                      when mscale_all_dim is non-zero, else 1 (DeepSeek's attention; the released V2 and V3
                      configs have mscale == mscale_all_dim, so the attention_factor is 1 and this carries
                      the whole correction).
The frequencies are computed in float32 in transformers' operation order, so they match its buffers.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """m(s, a) = 0.1 a ln s + 1 (YaRN's attention temperature), 1 for s <= 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(dim: int, theta: float, original_max_len: int, beta_fast: float, beta_slow: float,
                          truncate: bool = True) -> tuple[float, float]:
    """(low, high): the RoPE feature pairs between which the ramp goes from extrapolation to interpolation."""
    def correction_dim(rotations):
        return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(dim: int, theta: float, factor: float, original_max_len: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, truncate: bool = True) -> np.ndarray:
    """<float32>[dim / 2]: the YaRN inverse frequencies of a RoPE of `dim` features (see the module docstring)."""
    low, high = yarn_correction_range(dim, theta, original_max_len, beta_fast, beta_slow, truncate)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    f32 = np.float32
    exponents = np.arange(0, dim, 2).astype(f32) / f32(dim)
    pos_freqs = (np.float64(theta) ** exponents.astype(np.float64)).astype(f32)  # a correctly rounded float32 pow
    extrapolation = f32(1.0) / pos_freqs
    interpolation = f32(1.0) / (f32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    extrapolation_weight = f32(1) - ramp
    return (interpolation * (f32(1) - extrapolation_weight) + extrapolation * extrapolation_weight).astype(f32)


def yarn_attention_factor(factor: float, mscale: float = 0.0, mscale_all_dim: float = 0.0,
                          attention_factor: Optional[float] = None) -> float:
    """The factor on RoPE's cos and sin (see the module docstring)."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
    return float(yarn_get_mscale(factor))


def yarn_softmax_factor(factor: float, mscale_all_dim: float = 0.0) -> float:
    """The factor on the attention softmax scale: m(s, mscale_all_dim)^2, or 1 without mscale_all_dim."""
    if not mscale_all_dim:
        return 1.0
    m = yarn_get_mscale(factor, mscale_all_dim)
    return m * m
