"""Integer weights of compressed-tensors checkpoints in the "pack-quantized" format: the W4A16 and
W8A16 checkpoints that llm-compressor writes (GPTQ or round-to-nearest values) and vLLM serves.

A projection `X.weight` is stored as
- `X.weight_packed`: int32 [rows, ceil(cols * bits / 32)], 32 / bits values a word, value j of
  a word at bits [j * bits, (j + 1) * bits), each value q (signed) stored as q + 2^(bits - 1);
- `X.weight_scale`: [rows, groups] in the checkpoint's float type, `group_size` consecutive
  input features a group (strategy "group"), or [rows, 1] (strategy "channel");
- `X.weight_zero_point` (asymmetric weights only): the zero points z, packed the same way but
  along the rows: int32 [ceil(rows * bits / 32), groups];
- `X.weight_shape`: [rows, cols];
- `X.weight_g_idx` (GPTQ's activation order, actorder "group"): each column's group;
and w = (q - z) * scale.

read_dense() gives the weight in float32, exactly (each product of a small integer and a scale is
a float32 value). read_grouped() gives the kernels' GroupQuantized form of it, so that the weight
stays packed in memory and the GEMVs read 4 or 8 bits a weight: 4 bits as the values q + 8 in
0..15 with scale s and offset -(8 + z) * s in float16 (exact for symmetric weights, z = 0, the
common case; with zero points the offset is rounded to float16, 2^-11 of it, below bfloat16's
rounding of the weight); 8 bits as the signed values q with scale s (symmetric only). Whatever the
kernels do not run (channel strategy, 8-bit zero points, group sizes other than GROUPED_SIZES,
scales float16 cannot hold exactly) is None there and loads dequantized to the model's dtype."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..kernels.reference import GroupQuantized

# The group sizes every kernel of group-quantized weights runs (kernels/cpu.py's float GEMV takes
# 32 and 128; the integer GEMV and Triton take these too).
GROUPED_SIZES = (32, 128)
PACKED_SUFFIX = "_packed"
logger = logging.getLogger("llama3_dist")


@dataclass(frozen=True)
class PackedWeight:
    """One packed projection: `name` is its logical tensor (`X.weight`), the parts of the file
    are `name + suffix`."""

    name: str
    rows: int
    cols: int
    bits: int
    group_size: int  # cols for a scale per row
    symmetric: bool

    def part(self, suffix: str) -> str:
        return f"{self.name}{suffix}"


def find_packed_weights(checkpoint: Any) -> dict[str, PackedWeight]:
    """The checkpoint's packed projections by logical name, each checked against its shape,
    scales and group index (which are read here: a few numbers)."""
    files = checkpoint.files
    found = {}
    for packed_name in [n for n in files if n.endswith(".weight" + PACKED_SUFFIX)]:
        name = packed_name.removesuffix(PACKED_SUFFIX)
        for suffix in ("_shape", "_scale"):
            if f"{name}{suffix}" not in files:
                raise ConfigError(f"packed weight {packed_name!r} has no {name}{suffix!r} in the checkpoint")
        rows, cols = (int(v) for v in checkpoint.read_whole(f"{name}_shape").tolist())
        stored = checkpoint.shape(packed_name)
        bits = next((b for b in (4, 8) if stored == [rows, -(-cols * b // 32)]), None)
        if bits is None:
            raise ConfigError(
                f"packed weight {packed_name!r} has shape {stored}; a {rows} x {cols} weight packed in 4 or 8 "
                f"bits takes [{rows}, {-(-cols // 8)}] or [{rows}, {-(-cols // 4)}] int32 words"
            )
        scale_shape = checkpoint.shape(f"{name}_scale")
        groups = scale_shape[1] if len(scale_shape) == 2 and scale_shape[0] == rows else 0
        if not groups or cols % groups:
            raise ConfigError(
                f"{name}_scale has shape {scale_shape}; a {rows} x {cols} weight takes [{rows}, groups] with "
                f"groups dividing {cols} (strategy 'group') or [{rows}, 1] ('channel')"
            )
        group_size = cols // groups
        if f"{name}_g_idx" in files:
            order = checkpoint.read_whole(f"{name}_g_idx")
            if not torch.equal(order.long(), torch.arange(cols) // group_size):
                raise ConfigError(
                    f"{name}_g_idx assigns columns to groups out of order (GPTQ's actorder 'group'); not supported: "
                    f"use a checkpoint quantized with actorder 'weight' or none (their groups are consecutive columns)"
                )
        found[name] = PackedWeight(name, rows, cols, bits, group_size, f"{name}_zero_point" not in files)
    return found


def _fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [r, w] -> their unsigned bit fields [r, w * 32 / bits] as int32, in order."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)


def _values(checkpoint: Any, weight: PackedWeight, row0: int, stop: int, c0: int, c1: int) -> torch.Tensor:
    """Rows [row0, stop) x columns [c0, c1) of the stored values q + 2^(bits - 1), int32."""
    per_word = 32 // weight.bits
    w0, w1 = c0 // per_word, -(-c1 // per_word)
    words = checkpoint.read(weight.part(PACKED_SUFFIX), row0, stop - row0, (w0, w1))
    return _fields(words, weight.bits)[:, c0 - w0 * per_word : c1 - w0 * per_word]


def _zero_points(checkpoint: Any, weight: PackedWeight, row0: int, stop: int, g0: int, g1: int) -> torch.Tensor | None:
    """The zero points z of rows [row0, stop), groups [g0, g1), int32; None when symmetric."""
    if weight.symmetric:
        return None
    packed = checkpoint.read_whole(weight.part("_zero_point"))  # small: a value per group, packed
    unpacked = _fields(packed.T.contiguous(), weight.bits).T  # [rows (padded to a word), groups]
    return unpacked[row0:stop, g0:g1] - (1 << (weight.bits - 1))


def read_dense(
    checkpoint: Any, weight: PackedWeight, row0: int = 0, rows: int | None = None, cols: tuple[int, int] | None = None
) -> torch.Tensor:
    """The [row0, row0 + rows) x [cols) slice of the weight, float32 (exact)."""
    stop = weight.rows if rows is None else row0 + rows
    c0, c1 = (0, weight.cols) if cols is None else cols
    size = weight.group_size
    g0, g1 = c0 // size, -(-c1 // size)
    q = _values(checkpoint, weight, row0, stop, c0, c1) - (1 << (weight.bits - 1))
    scale = checkpoint.read(weight.part("_scale"), row0, stop - row0, (g0, g1)).float()
    group = torch.arange(c0, c1) // size - g0
    zero = _zero_points(checkpoint, weight, row0, stop, g0, g1)
    if zero is not None:
        q = q - zero[:, group]
    return q.float() * scale[:, group]


def read_grouped(
    checkpoint: Any, weight: PackedWeight, row0: int = 0, rows: int | None = None, cols: tuple[int, int] | None = None
) -> GroupQuantized | None:
    """The slice as read_dense() but in the kernels' grouped form (see the module's docstring);
    None where the kernels do not run it, or where a column slice cuts groups."""
    size = weight.group_size
    if size not in GROUPED_SIZES or (weight.bits == 8 and not weight.symmetric):
        return None
    stop = weight.rows if rows is None else row0 + rows
    c0, c1 = (0, weight.cols) if cols is None else cols
    if c0 % size or c1 % size:
        logger.warning(
            "%s: this rank's columns [%d, %d) cut its groups of %d values, so its slice loads dequantized (a "
            "tensor-parallel degree that divides its %d groups keeps it packed)",
            weight.name, c0, c1, size, weight.cols // size,
        )  # fmt: skip
        return None
    g0, g1 = c0 // size, c1 // size
    scale = checkpoint.read(weight.part("_scale"), row0, stop - row0, (g0, g1))
    scales = scale.to(torch.float16)
    if not (torch.isfinite(scales).all() and torch.equal(scales.to(scale.dtype), scale)):
        return None  # scales float16 cannot hold: dequantized at load instead
    values = _values(checkpoint, weight, row0, stop, c0, c1)
    if weight.bits == 8:
        return GroupQuantized((values - 128).to(torch.int8), scales, None, 8, size)
    zero = _zero_points(checkpoint, weight, row0, stop, g0, g1)
    shift = 8 if zero is None else 8 + zero
    offsets = (-shift * scale.float()).to(torch.float16)
    if not torch.isfinite(offsets).all():
        return None
    return GroupQuantized(values.to(torch.int8), scales, offsets, 4, size)


def save_pack_quantized(
    source: str | Path,
    path: str | Path,
    bits: int = 4,
    symmetric: bool = True,
    group_size: int = 128,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Writes the Hugging Face checkpoint at `source` to `path` as a compressed-tensors
    pack-quantized checkpoint, with compressed-tensors itself (an optional dependency:
    `pip install compressed-tensors`), as llm-compressor writes its W4A16 / W8A16 models: its
    quantization config on every Linear layer but the LM head, round-to-nearest min-max scales (and
    zero points when not symmetric) from its calculate_qparams, held in `scale_dtype`, then its
    pack-quantized compression. (llm-compressor's GPTQ would pick other values in the same format.)
    The tests' and benchmarks' packed checkpoints; also a way to make one without llm-compressor."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                groups = module.weight.view(module.weight.shape[0], -1, group_size)
                scale, zero_point = calculate_qparams(groups.amin(dim=2), groups.amax(dim=2), args)
                module.weight_scale.data = scale.to(scale_dtype)
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.data.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (Path(source) / extra).is_file() and not (Path(path) / extra).is_file():
            shutil.copy(Path(source) / extra, Path(path) / extra)
