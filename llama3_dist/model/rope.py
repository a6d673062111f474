"""Rotary frequency tables for the rope variants of the supported checkpoints.

The table is [max_seq_len, rotary_dim] float32, cos in the first half and sin in the second,
computed the way transformers computes it so float32 results match to rounding.
"""

from __future__ import annotations

import math

import torch

from ..config import Llama3Config


def inverse_frequencies(config: Llama3Config, factors: list[float] | None = None) -> torch.Tensor:
    dim = config.rotary_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if factors is not None:  # longrope: one extension factor per frequency
        inv = 1.0 / (
            torch.tensor(factors, dtype=torch.float32)
            * config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        )
    scaling = config.rope_scaling_params
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
    low_wl = scaling.orig_max_position / scaling.low_freq_factor
    high_wl = scaling.orig_max_position / scaling.high_freq_factor
    wl = 2 * math.pi / inv
    scaled = torch.where(wl > low_wl, inv / scaling.factor, inv)
    s = (scaling.orig_max_position / wl - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - s) * scaled / scaling.factor + s * scaled
    is_medium = ~(wl < high_wl) & ~(wl > low_wl)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_cache(config: Llama3Config) -> torch.Tensor:
    """cos|sin for every position < max_seq_len.

    LongRoPE: transformers switches the whole sequence to the long factors once it grows past
    original_max_position, which would make already-cached keys inconsistent. We choose per
    position (short factors below the boundary, long at and beyond it), as MAX and vLLM do; the
    two agree exactly for sequences within original_max_position.
    """
    positions = torch.arange(config.max_seq_len, dtype=torch.float32)
    longrope = config.longrope_scaling_params
    if longrope is None:
        freqs = torch.outer(positions, inverse_frequencies(config))
        scale = 1.0
    else:
        short = torch.outer(positions, inverse_frequencies(config, longrope.short_factor))
        long = torch.outer(positions, inverse_frequencies(config, longrope.long_factor))
        freqs = torch.where(positions[:, None] < longrope.original_max_position, short, long)
        scale = longrope.attention_factor
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)
