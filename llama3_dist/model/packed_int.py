"""Packed integer weights of quantized checkpoints, in the layouts people serve 4- and 8-bit
models in: compressed-tensors' "pack-quantized" (the W4A16 / W8A16 checkpoints llm-compressor
writes, GPTQ or round-to-nearest values; vLLM's format) and "int-quantized" (its int8 tensors),
AutoGPTQ's / GPTQModel's "gptq" and AutoAWQ's "awq" (GEMM version). One canonical form serves all:
for output row r and input column c, w = (u - zero[r, g]) * scale[r, g] with u the stored unsigned
value (0 .. 2^bits - 1), g = the column's group (consecutive columns, `group_size` a group, unless
a group index orders them by activation), zero in u's domain.

The layouts (a projection's module prefix X; rows are output features, cols input features):
- compressed-tensors: `X.weight_packed` int32 [rows, ceil(cols * bits / 32)], value j of a word at
  bits [j * bits, (j + 1) * bits), each signed q stored as u = q + 2^(bits - 1);
  `X.weight_scale` [rows, groups] (one group a row: per channel); `X.weight_zero_point` (with zero
  points only) the signed z packed the same way along the rows [ceil(rows * bits / 32), groups],
  stored as z + 2^(bits - 1), which is the zero in u's domain (2^(bits - 1) when symmetric);
  `X.weight_shape` [rows, cols]; `X.weight_g_idx` (actorder "group") each column's group.
- int-quantized (compressed-tensors' W8A8 models, run weight-only here: their activation scales are
  not used): `X.weight` int8 [rows, cols] holding q, u = q + 128; `X.weight_scale` [rows, groups]
  or [1] (per tensor); `X.weight_zero_point` int8 like the scales, zero = z + 128.
- gptq: `X.qweight` int32 [cols * bits / 32, rows] (packed along the input features, in order);
  `X.scales` [groups, rows]; `X.qzeros` int32 [groups, rows * bits / 32] (along the outputs), each
  stored as zero - 1 (checkpoint_format "gptq", AutoGPTQ's) or zero ("gptq_v2"); `X.g_idx` [cols].
- awq: `X.qweight` int32 [cols, rows * bits / 32] (packed along the outputs, value i of a word
  being output 8 * word + AWQ_ORDER[i]); `X.scales` [groups, rows]; `X.qzeros` [groups, rows / 8]
  packed as qweight, zero as stored.
(Read from compressed-tensors 0.20's pack_to_int32 / dequantize, AutoGPTQ 0.7's QuantLinear.pack
and AutoAWQ 0.2.9's WQLinear_GEMM.from_linear / dequantize_gemm.)

read_dense() gives a slice of the weight in float32, exactly (products of small integers and the
scales). read_grouped() gives it in the kernels' GroupQuantized form, so the weight stays packed
in memory and the GEMVs read 4 or 8 bits a weight: 4 bits as the values u with scale s and offset
-zero * s in float16 (exact for symmetric weights, zero 8: a power of two times s; with zero points
the offset is rounded to float16, 2^-11 of it, below bfloat16's rounding of the weight); 8 bits as
the signed u - 128 with scale s, symmetric only, also with a scale per row (the form of
quantization="int8"). What the kernels do not run (4 bits with a scale per row, group sizes other
than GROUPED_SIZES, 8-bit zero points, scales float16 cannot hold, columns grouped by activation
order, a rank's column slice that cuts a group) is None there and loads dequantized to the model's
dtype, exactly."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import ConfigError
from ..kernels.reference import GroupQuantized

# The group sizes every kernel of group-quantized weights runs (kernels/cpu.py's float GEMV takes
# 32 and 128; the integer GEMV and Triton take these too).
GROUPED_SIZES = (32, 128)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output 8 * word + AWQ_ORDER[i] is a word's value i
# How a checkpoint stores a projection (the module docstring describes each).
Layout = Literal["compressed-tensors", "int-quantized", "gptq", "awq"]
logger = logging.getLogger("llama3_dist")


@dataclass(frozen=True)
class PackedWeight:
    """One packed projection: `name` is its logical tensor (X.weight), `prefix` its module (X)."""

    name: str
    prefix: str
    layout: Layout
    rows: int
    cols: int
    bits: int
    group_size: int  # cols for a scale per row
    zero_stored_minus_one: bool  # gptq: qzeros hold zero - 1
    ordered: bool  # column c is in group c // group_size (no activation order)

    @property
    def parts(self) -> list[str]:
        """Its tensors in the file (those it has), the values first."""
        if self.layout == "compressed-tensors":
            return [f"{self.name}{s}" for s in ("_packed", "_scale", "_zero_point", "_shape", "_g_idx")]
        if self.layout == "int-quantized":  # activation scales of W8A8 schemes are not used
            names = ("weight", "weight_scale", "weight_zero_point", "weight_g_idx", "input_scale", "input_zero_point")
            return [f"{self.prefix}.{s}" for s in names]
        return [f"{self.prefix}.{s}" for s in ("qweight", "scales", "qzeros", "g_idx")]


def find_packed_weights(checkpoint: Any) -> dict[str, PackedWeight]:
    """The checkpoint's packed projections by logical name, each checked against its scales, zero
    points and group index (the small ones are read here)."""
    config = json.loads((Path(checkpoint.path) / "config.json").read_text()).get("quantization_config") or {}
    found = {}
    for stored in list(checkpoint.files):
        if stored.endswith(".weight_packed"):
            weight = _compressed_tensors_weight(checkpoint, stored.removesuffix("_packed"))
        elif stored.endswith(".weight") and f"{stored}_scale" in checkpoint.files:
            if checkpoint.stored_dtype(stored) != "I8":
                continue  # float8 weights with scales: WeightSource dequantizes those
            weight = _int_quantized_weight(checkpoint, stored)
        elif stored.endswith(".qweight"):
            weight = _gptq_or_awq_weight(checkpoint, stored.removesuffix(".qweight"), config)
        else:
            continue
        found[weight.name] = weight
    unordered = [w.name for w in found.values() if not w.ordered]
    if unordered:
        logger.warning(
            "%d packed weights (%s, ...) group their columns by activation order (GPTQ's desc_act, actorder "
            "'group'): the kernels run only consecutive groups, so these load dequantized (exact, at the memory of "
            "the model's dtype)",
            len(unordered), unordered[0],
        )  # fmt: skip
    return found


def _groups_in_order(checkpoint: Any, name: str, cols: int, group_size: int) -> bool:
    """Whether the columns' groups are consecutive columns (no group index, or one in order)."""
    if name not in checkpoint.files:
        return True
    order = checkpoint.read_whole(name).long()
    if order.shape != (cols,) or order.min() < 0 or order.max() >= -(-cols // group_size):
        raise ConfigError(
            f"{name!r} (shape {list(order.shape)}) must give each of {cols} columns one of its "
            f"{-(-cols // group_size)} groups"
        )
    return bool(torch.equal(order, torch.arange(cols) // group_size))


def _compressed_tensors_weight(checkpoint: Any, name: str) -> PackedWeight:
    files = checkpoint.files
    for suffix in ("_shape", "_scale"):
        if f"{name}{suffix}" not in files:
            raise ConfigError(f"packed weight {name + '_packed'!r} has no {name + suffix!r} in the checkpoint")
    rows, cols = (int(v) for v in checkpoint.read_whole(f"{name}_shape").tolist())
    stored = checkpoint.shape(f"{name}_packed")
    bits = next((b for b in (4, 8) if stored == [rows, -(-cols * b // 32)]), None)
    if bits is None:
        raise ConfigError(
            f"packed weight {name + '_packed'!r} has shape {stored}; a {rows} x {cols} weight packed in 4 or 8 "
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
    ordered = _groups_in_order(checkpoint, f"{name}_g_idx", cols, group_size)
    prefix = name.removesuffix(".weight")
    return PackedWeight(name, prefix, "compressed-tensors", rows, cols, bits, group_size, False, ordered)


def _int_quantized_weight(checkpoint: Any, name: str) -> PackedWeight:
    rows, cols = checkpoint.shape(name)
    scale_shape = checkpoint.shape(f"{name}_scale")
    if scale_shape in ([], [1], [1, 1]):
        groups = 1  # one scale for the tensor
    else:
        groups = scale_shape[1] if len(scale_shape) == 2 and scale_shape[0] == rows else 0
    if not groups or cols % groups:
        raise ConfigError(
            f"{name}_scale has shape {scale_shape}; {rows} x {cols} int8 weights take [{rows}, groups] with groups "
            f"dividing {cols}, [{rows}, 1] (per channel) or [1] (per tensor)"
        )
    ordered = _groups_in_order(checkpoint, f"{name}_g_idx", cols, cols // groups)
    prefix = name.removesuffix(".weight")
    return PackedWeight(name, prefix, "int-quantized", rows, cols, 8, cols // groups, False, ordered)


def _gptq_or_awq_weight(checkpoint: Any, prefix: str, config: dict) -> PackedWeight:
    method, bits = config.get("quant_method"), int(config.get("bits") or 0)
    if method not in ("gptq", "awq"):
        raise ConfigError(f"{prefix}.qweight: a GPTQ / AWQ tensor in a checkpoint whose quant_method is {method!r}")
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise ConfigError(f"{prefix}.qweight: {method} weights of {bits} bits: not supported (gptq: 4 or 8, awq: 4)")
    for part in ("scales", "qzeros"):
        if f"{prefix}.{part}" not in checkpoint.files:
            raise ConfigError(f"packed weight {prefix + '.qweight'!r} has no {prefix + '.' + part!r} in the checkpoint")
    stored, scale_shape = checkpoint.shape(f"{prefix}.qweight"), checkpoint.shape(f"{prefix}.scales")
    per_word = 32 // bits
    if method == "gptq":
        cols, rows = stored[0] * per_word, stored[1]
    else:
        cols, rows = stored[0], stored[1] * per_word
    groups = scale_shape[0] if len(scale_shape) == 2 and scale_shape[1] == rows else 0
    zero_shape = checkpoint.shape(f"{prefix}.qzeros")
    if not groups or zero_shape != [groups, rows // per_word]:
        raise ConfigError(
            f"{prefix}: qweight {stored}, scales {scale_shape} and qzeros {zero_shape} do not describe one "
            f"{rows} x {cols} weight of {bits}-bit values in groups ({method})"
        )
    group_size = cols if config.get("group_size", -1) in (-1, None) else int(config["group_size"])
    if -(-cols // group_size) != groups:
        raise ConfigError(
            f"{prefix}.scales has {groups} groups; {cols} columns in groups of {group_size} take "
            f"{-(-cols // group_size)}"
        )
    minus_one = method == "gptq" and config.get("checkpoint_format", "gptq") == "gptq"
    ordered = _groups_in_order(checkpoint, f"{prefix}.g_idx", cols, group_size)
    return PackedWeight(f"{prefix}.weight", prefix, method, rows, cols, bits, group_size, minus_one, ordered)


def _fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [r, w] -> their unsigned bit fields [r, w * 32 / bits] as int32, in order."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)


def _awq_order(fields: torch.Tensor) -> torch.Tensor:
    """AWQ's fields [.., 8 * words] (a word's value i is output 8 * word + AWQ_ORDER[i]) in output order."""
    inverse = torch.tensor(AWQ_ORDER).argsort()
    return fields.reshape(*fields.shape[:-1], -1, 8)[..., inverse].reshape(fields.shape)


def _values(checkpoint: Any, weight: PackedWeight, row0: int, stop: int, c0: int, c1: int) -> torch.Tensor:
    """The stored unsigned values u of rows [row0, stop) x columns [c0, c1), int32 [rows, cols]."""
    per_word = 32 // weight.bits
    if weight.layout == "compressed-tensors":  # [rows, cols / per_word]: packed along the columns
        w0, w1 = c0 // per_word, -(-c1 // per_word)
        words = checkpoint.read_stored(f"{weight.name}_packed", row0, stop - row0, (w0, w1))
        return _fields(words, weight.bits)[:, c0 - w0 * per_word : c1 - w0 * per_word]
    if weight.layout == "int-quantized":  # int8 [rows, cols], signed
        return checkpoint.read_stored(weight.name, row0, stop - row0, (c0, c1)).int() + 128
    qweight = f"{weight.prefix}.qweight"
    if weight.layout == "gptq":  # [cols / per_word, rows]: packed along the columns, transposed
        w0, w1 = c0 // per_word, -(-c1 // per_word)
        words = checkpoint.read_stored(qweight, w0, w1 - w0, (row0, stop))
        return _fields(words.T.contiguous(), weight.bits)[:, c0 - w0 * per_word : c1 - w0 * per_word]
    # awq: [cols, rows / per_word], packed along the rows in AWQ_ORDER
    w0, w1 = row0 // per_word, -(-stop // per_word)
    words = checkpoint.read_stored(qweight, c0, c1 - c0, (w0, w1))
    return _awq_order(_fields(words, weight.bits)).T[row0 - w0 * per_word : stop - w0 * per_word]


def _scales_and_zeros(checkpoint: Any, weight: PackedWeight, row0: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's scale (as stored) and zero (int32, in u's domain) of rows [row0, stop)."""
    bits = weight.bits
    if weight.layout == "int-quantized":
        scale_name, zero_name = f"{weight.name}_scale", f"{weight.name}_zero_point"
        if math.prod(checkpoint.shape(scale_name)) == 1 and weight.rows > 1:
            scales = checkpoint.read_whole(scale_name).reshape(1, 1).expand(stop - row0, 1)
        else:
            scales = checkpoint.read_stored(scale_name, row0, stop - row0).reshape(stop - row0, -1)
        if zero_name not in checkpoint.files:
            return scales, torch.full(scales.shape, 128, dtype=torch.int32)
        zeros = checkpoint.read_whole(zero_name).int().reshape(-1, scales.shape[1]).expand(weight.rows, -1)
        return scales, zeros[row0:stop] + 128
    if weight.layout == "compressed-tensors":
        scales = checkpoint.read_stored(f"{weight.name}_scale", row0, stop - row0)
        if f"{weight.name}_zero_point" not in checkpoint.files:
            return scales, torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32)
        zero_points = checkpoint.read_whole(f"{weight.name}_zero_point")  # small: a value per group
        if zero_points.dtype == torch.int32:  # packed along the rows
            return scales, _fields(zero_points.T.contiguous(), bits).T[row0:stop]
        # unpacked signed values [rows, groups] (compressed-tensors before it packed them, all zero when symmetric)
        return scales, zero_points.int().reshape(weight.rows, -1)[row0:stop] + (1 << (bits - 1))
    scales = checkpoint.read_stored(f"{weight.prefix}.scales", cols=(row0, stop)).T
    zeros = _fields(checkpoint.read_whole(f"{weight.prefix}.qzeros"), bits)  # [groups, rows]
    if weight.layout == "awq":
        zeros = _awq_order(zeros)
    zeros = zeros[:, row0:stop].T.contiguous()
    return scales, zeros + 1 if weight.zero_stored_minus_one else zeros


def _column_groups(checkpoint: Any, weight: PackedWeight, c0: int, c1: int) -> torch.Tensor:
    """The group of each of columns [c0, c1)."""
    if weight.ordered:
        return torch.arange(c0, c1) // weight.group_size
    g_idx = f"{weight.prefix}.g_idx" if weight.layout in ("gptq", "awq") else f"{weight.name}_g_idx"
    return checkpoint.read_whole(g_idx).long()[c0:c1]


def _warn_once(checkpoint: Any, reason: str, message: str) -> None:
    """A warning for the first weight of a checkpoint that loads dequantized for `reason`."""
    if reason not in checkpoint.warned:
        checkpoint.warned.add(reason)
        logger.warning(message)


def read_dense(
    checkpoint: Any, weight: PackedWeight, row0: int = 0, rows: int | None = None, cols: tuple[int, int] | None = None
) -> torch.Tensor:
    """The [row0, row0 + rows) x [cols) slice of the weight, float32 (exact)."""
    stop = weight.rows if rows is None else row0 + rows
    c0, c1 = (0, weight.cols) if cols is None else cols
    scales, zeros = _scales_and_zeros(checkpoint, weight, row0, stop)
    group = _column_groups(checkpoint, weight, c0, c1)
    values = _values(checkpoint, weight, row0, stop, c0, c1) - zeros[:, group]
    return values.float() * scales.float()[:, group]


def read_grouped(
    checkpoint: Any, weight: PackedWeight, row0: int = 0, rows: int | None = None, cols: tuple[int, int] | None = None
) -> GroupQuantized | None:
    """The slice as read_dense() but in the kernels' grouped form (see the module's docstring);
    None where the kernels do not run it, or where a column slice cuts groups. 8-bit symmetric
    weights with a scale per row (channel) come as one group a row, of the slice's width rounded
    up to 32 (the form of quantization="int8"; layers.use_grouped takes it as such)."""
    stop = weight.rows if rows is None else row0 + rows
    c0, c1 = (0, weight.cols) if cols is None else cols
    per_row = weight.group_size == weight.cols and weight.bits == 8
    size = -(-(c1 - c0) // 32) * 32 if per_row else weight.group_size
    if not (per_row or size in GROUPED_SIZES) or not weight.ordered:
        return None
    if not per_row and (c0 % size or c1 % size):
        _warn_once(
            checkpoint, "cut",
            f"{weight.name}: this rank's columns [{c0}, {c1}) cut its groups of {size} values, so its slice (and "
            f"any other cut this way) loads dequantized; a tensor-parallel degree that divides its "
            f"{weight.cols // size} groups keeps it packed",
        )  # fmt: skip
        return None
    scale, zeros = _scales_and_zeros(checkpoint, weight, row0, stop)
    if not per_row:
        scale, zeros = scale[:, c0 // size : c1 // size], zeros[:, c0 // size : c1 // size]
    scales = scale.to(torch.float16)
    if not (torch.isfinite(scales).all() and torch.equal(scales.to(scale.dtype), scale)):
        _warn_once(
            checkpoint, "scales",
            f"{weight.name}: its {scale.dtype} scales are not all float16 values (the kernels' scales), so it (and "
            f"any other such weight) loads dequantized",
        )  # fmt: skip
        return None
    values = _values(checkpoint, weight, row0, stop, c0, c1)
    if weight.bits == 8:
        if not bool((zeros == 128).all()):
            return None  # the 8-bit form is symmetric
        return GroupQuantized((values - 128).to(torch.int8), scales, None, 8, size)
    offsets = (-zeros * scale.float()).to(torch.float16)
    if not torch.isfinite(offsets).all():
        return None
    return GroupQuantized(values.to(torch.int8), scales, offsets, 4, size)


def save_compressed(
    source: str | Path,
    path: str | Path,
    bits: int = 4,
    symmetric: bool = True,
    group_size: int | None = 128,
    scale_dtype: torch.dtype = torch.bfloat16,
    packing: str = "pack-quantized",
    int8_activations: bool = False,
) -> None:
    """Writes the Hugging Face checkpoint at `source` to `path` as a compressed-tensors checkpoint
    of integer weights, with compressed-tensors itself (an optional dependency: `pip install
    compressed-tensors`), as llm-compressor writes its models: its quantization config on every
    Linear layer but the LM head (groups of `group_size` input features, or a scale per channel
    for None; int8_activations: W8A8's dynamic per-token int8 activations too), round-to-nearest
    min-max scales (and zero points when not symmetric) from its calculate_qparams, held in
    `scale_dtype`, then its `packing` compression ("pack-quantized": W4A16 / W8A16;
    "int-quantized": int8 tensors). (llm-compressor's GPTQ would pick other values in the same
    format.) The tests' and benchmarks' quantized checkpoints; also a way to make one without
    llm-compressor."""
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
    strategy = "channel" if group_size is None else "group"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    activations = (
        QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        if int8_activations
        else None
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=activations)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                rows, cols = module.weight.shape
                groups = module.weight.view(rows, -1, group_size or cols)
                scale, zero_point = calculate_qparams(groups.amin(dim=2), groups.amax(dim=2), args)
                module.weight_scale.data = scale.to(scale_dtype)
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.data.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=packing)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    for extra in Path(source).iterdir():  # the tokenizer, its chat template, the generation config
        if extra.is_file() and extra.suffix != ".safetensors" and not (Path(path) / extra.name).exists():
            shutil.copy(extra, Path(path) / extra.name)
