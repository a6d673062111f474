"""Hugging Face safetensors checkpoints: files, index, per-architecture names, per-rank slices.

CHECKPOINT_NAMES is the one table of tensor names: per architecture, what each logical weight
is called and which are stored fused. A rank asks WeightSource for a logical tensor and,
optionally, a range of its rows or columns; only those bytes are read from disk (safetensors
`get_slice`). Phi-3's fused `qkv_proj` and `gate_up_proj` are presented as their q/k/v and
gate/up parts, so sharding by heads never needs the fused tensor whole.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ConfigError, Llama3Config
from ..kernels.reference import GroupQuantized
from . import packed_int
from .packed_int import find_packed_weights

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some exporters write that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class CheckpointNames:
    """The tensor names of one architecture's checkpoints. Layer parts are relative to `layer`
    (with the layer's index); a weight adds ".weight", a bias ".bias"."""

    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer: str = "model.layers.{index}"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    # A tensor the checkpoint stores fused -> the logical parts stacked in its rows, in order.
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def layer_tensor(self, index: int, part: str) -> str:
        """The name of layer `index`'s `part` (a field name, e.g. "q_proj"), without .weight."""
        return f"{self.layer.format(index=index)}.{getattr(self, part)}"


LLAMA_NAMES = CheckpointNames()
CHECKPOINT_NAMES = {
    "LlamaForCausalLM": LLAMA_NAMES,
    "MistralForCausalLM": LLAMA_NAMES,
    "Qwen2ForCausalLM": LLAMA_NAMES,
    "GraniteForCausalLM": LLAMA_NAMES,
    "OlmoForCausalLM": LLAMA_NAMES,
    "Phi3ForCausalLM": CheckpointNames(
        fused={
            "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        }
    ),
}


@dataclass(frozen=True, slots=True)
class _Location:
    name: str  # tensor name in the file
    row0: int  # first row of the logical tensor inside it (fused tensors)
    rows: int | None  # rows of the logical tensor (None: all)


class Checkpoint:
    """The safetensors files of one checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"no config.json in {str(self.path)!r}: expected a Hugging Face checkpoint directory")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                if pickles:
                    raise CheckpointError(
                        f"{str(self.path)!r} holds only pickle checkpoints ({', '.join(pickles)}); they are "
                        f"refused because loading them runs arbitrary code. Convert them to safetensors "
                        f"(e.g. model.save_pretrained(dir, safe_serialization=True))."
                    )
                raise CheckpointError(f"no model.safetensors in {str(self.path)!r}")
            self.files = {}
            for file in files:
                with safe_open(file, framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))
        self._handles: dict[Path, object] = {}
        self.consumed: set[str] = set()
        # Packed integer projections (compressed-tensors, GPTQ, AWQ) under their logical names
        # (X.weight); empty while they are found, which reads shapes through shape()
        self.packed: dict[str, packed_int.PackedWeight] = {}
        self.warned: set[str] = set()  # why packed weights loaded dequantized, warned once each
        self.packed = find_packed_weights(self)
        for name, weight in self.packed.items():
            self.files[name] = self.files[weight.parts[0]]

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"checkpoint file {str(file)!r} named in the index is missing")
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> list[int]:
        if name in self.packed:
            return [self.packed[name].rows, self.packed[name].cols]
        return list(self._open(self.files[name]).get_slice(name).get_shape())

    def stored_dtype(self, name: str) -> str:
        """The tensor's type as the file stores it (safetensors' names: "I8", "BF16", ...)."""
        return self._open(self.files[name]).get_slice(name).get_dtype()

    def read(
        self, name: str, row0: int = 0, rows: int | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Rows [row0, row0 + rows) (all: None) and columns [cols) of a tensor; a packed integer
        projection (model/packed_int.py) dequantized to float32."""
        if name in self.packed:
            self.consumed.add(name)
            self.consumed.update(n for n in self.packed[name].parts if n in self.files)
            return packed_int.read_dense(self, self.packed[name], row0, rows, cols)
        return self.read_stored(name, row0, rows, cols)

    def read_stored(
        self, name: str, row0: int = 0, rows: int | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """As read(), but the tensor as the file stores it."""
        self.consumed.add(name)
        sl = self._open(self.files[name]).get_slice(name)
        stop = None if rows is None else row0 + rows
        if cols is None:
            return sl[row0:stop]
        return sl[row0:stop, cols[0] : cols[1]]

    def read_grouped(
        self, name: str, row0: int = 0, rows: int | None = None, cols: tuple[int, int] | None = None
    ) -> GroupQuantized | None:
        """A packed integer projection's slice in the kernels' grouped form (model/packed_int.py);
        None for every other tensor and for packed forms the kernels do not run."""
        weight = self.packed.get(name)
        if weight is None:
            return None
        grouped = packed_int.read_grouped(self, weight, row0, rows, cols)
        if grouped is not None:
            self.consumed.add(name)
            self.consumed.update(n for n in weight.parts if n in self.files)
        return grouped

    def read_whole(self, name: str) -> torch.Tensor:
        """The whole tensor (also a 0-d one, which slices cannot read)."""
        self.consumed.add(name)
        return self._open(self.files[name]).get_tensor(name)

    def unexpected(self) -> list[str]:
        return sorted(n for n in self.files if n not in self.consumed and not n.endswith(IGNORED_SUFFIXES))

    def close(self) -> None:
        self._handles.clear()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at `path`: a Hugging Face safetensors directory, or a GGUF file (or a
    directory holding one and no config.json), read through the same interface."""
    from .gguf import GGUFCheckpoint, find_gguf

    gguf_file = find_gguf(path)
    return GGUFCheckpoint(gguf_file) if gguf_file is not None else Checkpoint(path)  # type: ignore[return-value]


class WeightSource:
    """Logical (Llama-named) tensors of a checkpoint, converted to the model's dtype."""

    def __init__(self, checkpoint: Checkpoint, config: Llama3Config, device: torch.device | str = "cpu"):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.config = config
        self.dtype = TORCH_DTYPES[config.dtype]
        self.names = CHECKPOINT_NAMES[config.architecture]
        self._fused = self._fused_parts(config, self.names)

    @staticmethod
    def _fused_parts(config: Llama3Config, names: CheckpointNames) -> dict[str, tuple[str, int, int]]:
        """Logical part (e.g. "self_attn.k_proj") -> (stored tensor, first row, rows) for the
        tensors this architecture stores fused."""
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_key_value_heads * config.head_dim
        rows = {
            "self_attn.q_proj": q_rows,
            "self_attn.k_proj": kv_rows,
            "self_attn.v_proj": kv_rows,
            "mlp.gate_proj": config.intermediate_size,
            "mlp.up_proj": config.intermediate_size,
        }
        parts = {}
        for stored, logical in names.fused.items():
            row0 = 0
            for part in logical:
                parts[part] = (stored, row0, rows[part])
                row0 += rows[part]
        return parts

    def _locate(self, name: str) -> _Location:
        for part, (fused, row0, rows) in self._fused.items():
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                return _Location(f"{name[: -len(suffix)]}.{fused}.weight", row0, rows)
        return _Location(name, 0, None)

    def has(self, name: str) -> bool:
        return self._locate(name).name in self.checkpoint.files

    def read(
        self,
        name: str,
        shape: tuple[int, ...],
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The logical tensor `name` of full shape `shape`, or its [rows) / [cols) slice."""
        stored_name, row0, rows_read = self._slice(name, shape, rows)
        tensor = self.checkpoint.read(stored_name, row0, rows_read, cols)
        if tensor.dtype in FP8_DTYPES:
            tensor = self._dequantize_fp8(stored_name, tensor, row0)
        # A column slice comes back as a strided view of whole rows: copying it out frees the rows
        # this rank does not hold, and kernels (oneDNN, the CPU GEMV) need contiguous weights.
        out = tensor.to(device=self.device, dtype=self.dtype).contiguous()
        if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            # Still a view of safetensors' private map of the whole file: one such tensor kept
            # (a norm's weight) keeps every page of the file the load read mapped and resident.
            out = out.clone()
        return out

    def _dequantize_fp8(self, stored_name: str, values: torch.Tensor, row0: int) -> torch.Tensor:
        """An FP8 weight's rows [row0, row0 + len(values)) (any column slice) times its scale
        (`<name>_scale`: one per tensor, or one per output row), in float32. The activation
        scales of static FP8 schemes (`input_scale`) are not used: activations stay in the
        model's dtype, so this computes what the dequantized checkpoint computes."""
        base = stored_name.removesuffix(".weight")
        scale_name = f"{base}.weight_scale"
        files = self.checkpoint.files
        if scale_name not in files:
            raise CheckpointError(f"{stored_name!r} is stored in {values.dtype} but {scale_name!r} is missing")
        if f"{base}.input_scale" in files:
            self.checkpoint.consumed.add(f"{base}.input_scale")
        scale_shape = self.checkpoint.shape(scale_name)
        rows = self.checkpoint.shape(stored_name)[0]
        if math.prod(scale_shape) == 1:
            scale = self.checkpoint.read_whole(scale_name).reshape(1, 1)
        elif scale_shape in ([rows], [rows, 1]):
            scale = self.checkpoint.read(scale_name, row0, len(values)).reshape(-1, 1)
        else:
            raise CheckpointError(
                f"{scale_name!r} has shape {scale_shape}; FP8 weights of {rows} rows need one scale per tensor or "
                f"per row (block-wise scales are not supported)"
            )
        return values.float() * scale.float()

    def read_grouped(
        self,
        name: str,
        shape: tuple[int, ...],
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> GroupQuantized | None:
        """Like read(), but the weight as stored when the checkpoint stores it group-quantized in a
        form the kernels run (model/gguf.py's GROUPED_TYPES, model/packed_int.py's packed integers);
        None otherwise (then read() gives it dequantized)."""
        read_grouped = getattr(self.checkpoint, "read_grouped", None)
        if read_grouped is None:
            return None
        stored_name, row0, rows_read = self._slice(name, shape, rows)
        return read_grouped(stored_name, row0, rows_read, cols)

    def _slice(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None) -> tuple[str, int, int | None]:
        """(stored tensor, first row, rows or None for all) of the logical tensor `name` of full
        shape `shape` (or its [rows) slice), checked against the checkpoint."""
        loc = self._locate(name)
        files = self.checkpoint.files
        if loc.name not in files:
            raise CheckpointError(
                f"tensor {loc.name!r} is missing from the checkpoint in "
                f"{str(self.checkpoint.path)!r} ({self.config.architecture})"
            )
        stored = self.checkpoint.shape(loc.name)
        logical = [loc.rows, *stored[1:]] if loc.rows is not None else stored
        fits = loc.rows is None or loc.row0 + loc.rows <= stored[0]
        if list(shape) != logical or not fits:
            raise CheckpointError(
                f"tensor {loc.name!r} in {files[loc.name].name} has shape {stored}, "
                f"expected {list(shape)} for {name!r} from config.json"
            )
        r0, nrows = (0, None) if rows is None else (rows[0], rows[1] - rows[0])
        return loc.name, loc.row0 + r0, nrows if nrows is not None else loc.rows

    def skip(self, name: str) -> None:
        """Marks `name` as accounted for without reading it (a tied LM head some exporters write
        as a copy of the embedding), if the checkpoint has it."""
        location = self._locate(name)
        if location.name in self.checkpoint.files:
            self.checkpoint.consumed.add(location.name)

    def check_all_consumed(self) -> None:
        extra = self.checkpoint.unexpected()
        if extra:
            shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
            raise CheckpointError(
                f"unexpected tensors in the checkpoint in {str(self.checkpoint.path)!r}: "
                f"{shown}; it does not look like a {self.config.architecture}"
            )


class DummyWeights(WeightSource):
    """Random weights made on the device, for benchmarks of shapes nobody has downloaded
    (vLLM's load_format="dummy"): every logical tensor is normal(0, 0.02), norms are ones,
    biases zeros, seeded by name so that every rank slices the same full tensor."""

    def __init__(self, config: Llama3Config, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.config = config
        self.dtype = TORCH_DTYPES[config.dtype]
        self.names = CHECKPOINT_NAMES[config.architecture]

    def has(self, name: str) -> bool:
        return True

    def read(
        self,
        name: str,
        shape: tuple[int, ...],
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if name.endswith(".bias"):
            full = torch.zeros(shape, dtype=self.dtype, device=self.device)
        elif len(shape) == 1:  # norm weights
            full = torch.ones(shape, dtype=self.dtype, device=self.device)
        else:
            generator = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()))
            full = torch.empty(shape, dtype=self.dtype, device=self.device).normal_(0.0, 0.02, generator=generator)
        if rows is not None:
            full = full[rows[0] : rows[1]]
        if cols is not None:
            full = full[:, cols[0] : cols[1]]
        return full.contiguous()

    def read_grouped(
        self,
        name: str,
        shape: tuple[int, ...],
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
    ) -> GroupQuantized | None:
        return None  # random weights are made dense

    def skip(self, name: str) -> None:
        pass

    def check_all_consumed(self) -> None:
        pass
