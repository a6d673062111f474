"""GGUF checkpoints (llama.cpp's single-file format): config, tokenizer and weights from a .gguf.

`LLM(model="file.gguf")` (or a directory holding one .gguf and no config.json) reads:
- the config from the file's metadata (llama architecture keys) as a Hugging Face config dict;
- the tokenizer and chat template through transformers' GGUF conversion;
- the weights through our own parse of the file (GGUFFile; the `gguf` package gives the types'
  block sizes and the dequantizers), dequantized to float32 as each rank reads its
  slice: whole rows for column-parallel weights, and for row-parallel ones a column range that
  must not cut a quantization block (an error names the tensor and the block size). llama.cpp's
  converter permutes the rows of q and k within each head (its rotary layout); that is undone.

Quantized matrices can also be read in the kernels' grouped form (read_grouped: integers with a
float16 scale, and for 4 bits an offset, per group of 32; a GroupQuantized) for kernels that
multiply them without dequantizing: Q8_0, Q4_0 and Q4_1 as stored; Q5_0 exactly, its 5-bit values
held in 8; Q4_K with each 32-value sub-block's scale d * sc and minimum dmin * m rounded to
float16 (relative 2^-11, below bfloat16's rounding of a dequantized weight); Q5_1, Q5_K and Q6_K,
which have no exact form there, requantized to 8 bits in groups of 32 (each value within 1/254 of
its group's largest |w|, a sixteenth of a 5-bit step: Q4_K_M files keep their LM head and some
layers' v and down in Q6_K, and Q5_K_M files are mostly Q5_K). The others (and norms,
embeddings) are dequantized to the model's dtype (float32 by default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ConfigError
from ..kernels.reference import GroupQuantized, quantize_int8_groups

if TYPE_CHECKING:
    import torch

GGUF_SUFFIX = ".gguf"
ARCHITECTURES = ("llama",)  # general.architecture values read here
# The tensor types read (others are refused, naming the type).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# The types read_grouped returns in the kernels' grouped form (see the module's docstring).
GROUPED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_1", "Q5_K", "Q6_K")
REQUANTIZED_TYPES = ("Q5_1", "Q5_K", "Q6_K")  # of those, the ones requantized to 8 bits
# llama.cpp tensor names -> Hugging Face names ({i}: the layer).
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def find_gguf(path: str | Path) -> Path | None:
    """The .gguf file `path` names: the file itself, or the one .gguf in a directory that has no
    config.json (a Hugging Face directory wins). None when it is not a GGUF checkpoint."""
    path = Path(path)
    if path.suffix == GGUF_SUFFIX:
        if not path.is_file():
            raise ConfigError(f"no GGUF file at {str(path)!r}")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(files) > 1:
        raise ConfigError(
            f"{str(path)!r} holds several GGUF files ({', '.join(f.name for f in files)}); name one of them"
        )
    return files[0] if files else None


# GGUF metadata value types (the spec's numbering): struct formats of the scalars; 8 is a
# string (a 64-bit length, then UTF-8 bytes), 9 an array (element type, 64-bit count, elements).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # llama.cpp's GGML_MAX_DIMS


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry: its GGUF name, type (a GGMLQuantizationType, or the number of a type
    the gguf package does not know), shape in GGUF's order (ne0, the columns, first) and where
    its bytes lie in the file."""

    name: str
    kind: Any
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def kind_name(self) -> str:
        return getattr(self.kind, "name", f"type {self.kind}")


class GGUFFile:
    """A GGUF file's metadata and tensor index, read with struct from a map of the file; the
    tensors' bytes are NumPy views of that map (nothing is copied until a rank slices them).

    Why not the gguf package's GGUFReader: it builds NumPy views for every metadata item, and a
    real vocabulary has ~100,000 strings (SmolLM2: 5-7 s on 2 cores, in the driver and again
    in every rank); here the walk over them takes tens of milliseconds."""

    def __init__(self, file: Path):
        import mmap

        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ValueError(f"{size} bytes is shorter than a GGUF header")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buffer, self._size = self._map, size
        if buffer[:4] != b"GGUF":
            raise ValueError(f"it starts with {bytes(buffer[:4])!r}, not GGUF's magic b'GGUF'")
        (version,) = struct.unpack_from("<I", buffer, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (byte-swapped: a big-endian file?); accepted: 2, 3")
        num_tensors, num_items = struct.unpack_from("<QQ", buffer, 8)
        self._offset = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(self._count(num_items, 12)):
            key = self._string()
            (kind,) = self._unpack("<I")
            self.metadata[key] = self._value(kind)
        self._metadata_end = self._offset
        infos = []
        for _ in range(self._count(num_tensors, 24)):
            name = self._string()
            (num_dims,) = self._unpack("<I")
            if not 1 <= num_dims <= _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {num_dims} dimensions")
            shape = self._unpack(f"<{num_dims}Q")
            kind, offset = self._unpack("<IQ")
            infos.append((name, kind, shape, offset))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"general.alignment is {alignment!r}, not a positive integer")
        data_start = -(-self._offset // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        for name, kind, shape, offset in infos:
            try:
                kind = GGMLQuantizationType(kind)
                block, block_bytes = GGML_QUANT_SIZES[kind]
                nbytes = math.prod(shape) // block * block_bytes
            except (ValueError, KeyError):  # a type this gguf package does not know: refused by name later
                nbytes = 0
            if data_start + offset + nbytes > size:
                raise ValueError(f"tensor {name!r} ends past the end of the file")
            self.tensors.append(GGUFTensor(name, kind, tuple(shape), data_start + offset, nbytes))

    @functools.cached_property
    def metadata_digest(self) -> str:
        """What the tokenizer is made from (the header and metadata bytes), whatever the file's
        name, path or time stamp: a reinstalled or copied file finds its converted tokenizer in
        the cache. Only the process that loads the tokenizer hashes them, not every rank."""
        return hashlib.sha256(self._map[: self._metadata_end]).hexdigest()[:24]

    def data(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as a view of the file: float32 / float16 values [rows, columns] for
        F32 / F16 matrices (a vector for 1-D tensors), raw bytes [rows, bytes per row] otherwise."""
        name = getattr(tensor.kind, "name", "")
        dtype = {"F32": np.float32, "F16": np.float16}.get(name, np.uint8)
        count = tensor.nbytes // np.dtype(dtype).itemsize
        flat = np.frombuffer(self._map, dtype=dtype, count=count, offset=tensor.offset)
        return flat if len(tensor.shape) == 1 else flat.reshape(math.prod(tensor.shape[1:]), -1)

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._map, self._offset)
        self._offset += struct.calcsize(fmt)
        return values

    def _count(self, count: int, least_bytes: int) -> int:
        """A count read from the file, checked against the bytes left (a corrupted count would
        otherwise loop for ages)."""
        if count * least_bytes > self._size - self._offset:
            raise ValueError(f"a count of {count} items at byte {self._offset} does not fit in the file")
        return count

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        end = self._offset + length
        if end > self._size:
            raise ValueError(f"a string of {length} bytes at byte {self._offset} runs past the end")
        text = self._map[self._offset : end].decode("utf-8", errors="surrogateescape")
        self._offset = end
        return text

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            element, count = self._unpack("<IQ")
            if element in _SCALARS:  # numbers: one NumPy read
                dtype = np.dtype(_SCALARS[element].replace("?", "b1"))
                values = np.frombuffer(self._map, dtype, self._count(count, dtype.itemsize), self._offset)
                self._offset += count * dtype.itemsize
                return values.tolist()
            return [self._value(element) for _ in range(self._count(count, 8))]
        if kind not in _SCALARS:
            raise ValueError(f"metadata value type {kind} is not one of GGUF's")
        (value,) = self._unpack(_SCALARS[kind])
        return value


def _reader(file: Path) -> GGUFFile:
    """One parse per file and process: the config, the checks and the weights all need it."""
    resolved = Path(file).resolve()
    stat = resolved.stat()
    return _cached_reader(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(file: str, size: int, mtime_ns: int) -> GGUFFile:
    try:
        import gguf  # noqa: F401  (the quantization types' table and dequantizers)
    except ImportError:
        raise ImportError(f"reading {file!r} needs the gguf package: pip install 'llama3-dist[gguf]'") from None
    try:
        return GGUFFile(Path(file))
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as e:
        raise ConfigError(
            f"{file!r} is not a readable GGUF file ({size} bytes; truncated or corrupted?): {e}"
        ) from None


def release_readers() -> None:
    """Lets go of the parsed files _reader keeps for the config, the tokenizer and the weights
    (each holds a map of its whole file). Called once a process has read what it needs: by the
    worker after the weights, by make_executor once Ray ranks are up (the driver's parse)."""
    _cached_reader.cache_clear()


def gguf_config(file: str | Path) -> dict[str, Any]:
    """The file's metadata as a Hugging Face LlamaForCausalLM config dict."""
    reader = _reader(Path(file))
    metadata = reader.metadata
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{str(file)!r}: GGUF architecture {arch!r} is not read here; accepted: {', '.join(ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{name}", default)

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ConfigError(
            f"{str(file)!r} carries per-dimension rope factors (rope_freqs: Llama 3.1 style rope scaling), "
            f"which this reader does not apply; use the Hugging Face checkpoint"
        )
    hidden, heads = key("embedding_length"), key("attention.head_count")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", key("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 2048),
        "vocab_size": key("vocab_size", len(tokens)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",  # the weights are dequantized to float32
    }
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ConfigError(f"{str(file)!r}: rope scaling {scaling!r} is not read here; accepted: linear")
        config["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor", 1.0)}
    return config


def tokenizer_cache() -> Path:
    """Where converted GGUF tokenizers are kept."""
    from ..paths import cache_root

    return cache_root() / "gguf-tokenizers"


def load_gguf_tokenizer(file: Path):
    """The Hugging Face tokenizer converted from the file's metadata (vocabulary, merges, special
    tokens, chat template), or None when the file carries no tokenizer."""
    from ..tokenizer import load_saved_tokenizer

    reader = _reader(file)
    if reader.metadata.get("tokenizer.ggml.model") is None:
        return None
    # transformers' conversion takes seconds for a real vocabulary (8-14 s for SmolLM2's on 2
    # cores): keep the result, keyed by the metadata it is made from.
    cached = tokenizer_cache() / f"{file.stem}-{reader.metadata_digest}"
    if (cached / "tokenizer_config.json").is_file():
        return load_saved_tokenizer(cached)
    tokenizer = _gguf_tokenizer_class(file).from_pretrained(str(file.parent), gguf_file=file.name)
    with contextlib.suppress(OSError):  # a read-only cache only costs the conversion next time
        staging = cached.with_name(f"{cached.name}.{os.getpid()}")
        tokenizer.save_pretrained(str(staging))
        if cached.exists():  # another process converted it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.replace(cached)
    return tokenizer


def _gguf_tokenizer_class(file: Path) -> Any:
    """The class AutoTokenizer would build this file's tokenizer as, without its detour: to pick
    the class, AutoTokenizer first parses the whole file for a config through the gguf package
    (5-11 s for SmolLM2's vocabulary on 2 cores). transformers 5 maps the llama model type to no
    tokenizer class, so every Llama GGUF becomes a TokenizersBackend (which converts from the
    metadata alone, in ~0.4 s) unless a tokenizer_config.json beside the file names a class."""
    from transformers import AutoTokenizer

    try:
        from transformers import TokenizersBackend  # transformers >= 5
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
    except ImportError:
        return AutoTokenizer
    if TOKENIZER_MAPPING_NAMES.get("llama") is not None or (file.parent / "tokenizer_config.json").exists():
        return AutoTokenizer
    return TokenizersBackend


def _unpermute(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head it stores the rotary pairs' first halves
    interleaved with their second halves; Hugging Face keeps each half contiguous."""
    heads = rows.shape[0] // head_dim
    return rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _grouped_arrays(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(values [rows, k] int8, scales and offsets [rows, k / 32] float16, offsets None for
    symmetric 8 bits) of the stored blocks [rows, blocks, bytes] of a Q8_0, Q4_0, Q4_1, Q5_0 or
    Q4_K matrix; None when a Q4_K sub-block's scale or minimum overflows float16."""
    rows = blocks.shape[0]

    def halves(lo: int) -> np.ndarray:  # a float16 field of every block
        return np.ascontiguousarray(blocks[:, :, lo : lo + 2]).view(np.float16)[:, :, 0]

    def nibbles(packed: np.ndarray) -> np.ndarray:  # bytes [..., 16] -> values [..., 32]: low nibbles first
        return np.concatenate([packed & 0xF, packed >> 4], axis=-1)

    if kind == "Q8_0":  # w = d * q
        return blocks[:, :, 2:].view(np.int8).reshape(rows, -1), halves(0), None
    if kind in ("Q4_0", "Q4_1"):  # Q4_0: w = d * (q - 8); Q4_1: w = d * q + m
        values = nibbles(blocks[:, :, -16:]).reshape(rows, -1).astype(np.int8)
        scales = halves(0)
        offsets = (scales.astype(np.float32) * -8.0).astype(np.float16) if kind == "Q4_0" else halves(2)
        return values, scales, offsets  # (-8 * d is exact: a power of two)
    if kind == "Q5_0":  # w = d * (q - 16), q's fifth bits in a little-endian 32-bit word
        high = np.ascontiguousarray(blocks[:, :, 2:6]).view("<u4")[:, :, :1] >> np.arange(32, dtype=np.uint32) & 1
        values = (nibbles(blocks[:, :, 6:22]) | (high << 4).astype(np.uint8)).astype(np.int8) - 16
        return values.reshape(rows, -1), halves(0), None
    assert kind == "Q4_K"
    # 256 values a block: d and dmin (float16), 8 sub-blocks' 6-bit scales sc and minimums m in
    # 12 bytes, then 4 chunks of 32 bytes, each two sub-blocks (low nibbles, then high ones);
    # w = d * sc * q - dmin * m.
    packed = blocks[:, :, 4:16].astype(np.int32)
    low, middle, high = packed[:, :, 0:4], packed[:, :, 4:8], packed[:, :, 8:12]
    sc = np.concatenate([low & 63, (high & 0xF) | (low >> 6) << 4], axis=2)
    m = np.concatenate([middle & 63, (high >> 4) | (middle >> 6) << 4], axis=2)
    with np.errstate(over="ignore"):
        scales = (halves(0).astype(np.float32)[:, :, None] * sc).astype(np.float16).reshape(rows, -1)
        offsets = (-(halves(2).astype(np.float32)[:, :, None] * m)).astype(np.float16).reshape(rows, -1)
    if not (np.isfinite(scales).all() and np.isfinite(offsets).all()):
        return None
    chunks = blocks[:, :, 16:].reshape(rows, -1, 4, 1, 32)
    values = np.concatenate([chunks & 0xF, chunks >> 4], axis=3).reshape(rows, -1).astype(np.int8)
    return values, scales, offsets


class GGUFCheckpoint:
    """The tensors of a GGUF file under their Hugging Face names, read slice by slice (the
    interface of checkpoint.Checkpoint)."""

    def __init__(self, file: str | Path):
        from gguf import GGML_QUANT_SIZES

        self.path = Path(file)
        self._reader: GGUFFile | None = _reader(self.path)
        config = gguf_config(self.path)
        self.head_dim = config["head_dim"]
        self._tensors = {}
        for tensor in self._file().tensors:
            name = _hf_name(tensor.name)
            if name is None:
                continue
            kind = tensor.kind_name
            if kind not in SUPPORTED_TYPES:
                raise ConfigError(
                    f"{self.path.name}: tensor {tensor.name!r} is {kind}, not read here; "
                    f"accepted: {', '.join(SUPPORTED_TYPES)}"
                )
            self._tensors[name] = tensor
        self._quant_sizes = GGML_QUANT_SIZES
        self.files = dict.fromkeys(self._tensors, self.path)
        self.consumed: set[str] = set()

    def _file(self) -> GGUFFile:
        if self._reader is None:
            raise RuntimeError(f"{self.path.name} was closed")
        return self._reader

    def shape(self, name: str) -> list[int]:
        return [int(n) for n in reversed(self._tensors[name].shape)]  # GGUF lists ne0 (columns) first

    def read(
        self, name: str, row0: int = 0, rows: int | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        import torch
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        self.consumed.add(name)
        if len(tensor.shape) == 1:  # norms: float32 vectors
            vector = np.asarray(self._file().data(tensor), dtype=np.float32)
            return torch.from_numpy(vector[row0 : None if rows is None else row0 + rows].copy())
        out_rows, in_cols = self.shape(name)
        stop = out_rows if rows is None else row0 + rows
        kind = tensor.kind
        block, type_size = self._quant_sizes[kind]
        data = self._file().data(tensor)[row0:stop]  # quantized rows stay whole
        c0, c1 = (0, in_cols) if cols is None else cols
        self._check_block_aligned(tensor, in_cols, c0, c1)
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            values = np.asarray(data, dtype=np.float32)[:, c0:c1]
        else:
            bytes_per_value = type_size / block
            raw = data.view(np.uint8)[:, int(c0 * bytes_per_value) : int(c1 * bytes_per_value)]
            values = dequantize(np.ascontiguousarray(raw), kind).astype(np.float32)
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            values = _unpermute(values, self.head_dim)
        return torch.from_numpy(np.ascontiguousarray(values))

    def read_grouped(
        self, name: str, row0: int = 0, rows: int | None = None, cols: tuple[int, int] | None = None
    ) -> GroupQuantized | None:
        """The [row0, row0 + rows) x [cols) slice of a matrix of one of GROUPED_TYPES in groups of
        32 (see the module's docstring); None for other types, and for a Q4_K tensor whose
        sub-block scales do not fit float16 (read() dequantizes those)."""
        import torch

        tensor = self._tensors[name]
        kind = tensor.kind_name
        if kind not in GROUPED_TYPES or len(tensor.shape) != 2:
            return None
        self.consumed.add(name)
        out_rows, in_cols = self.shape(name)
        stop = out_rows if rows is None else row0 + rows
        c0, c1 = (0, in_cols) if cols is None else cols
        self._check_block_aligned(tensor, in_cols, c0, c1)
        block, block_bytes = self._quant_sizes[tensor.kind]
        data = self._file().data(tensor)[row0:stop]  # a quantized type's bytes, whole rows
        blocks = data[:, c0 // block * block_bytes : c1 // block * block_bytes].reshape(stop - row0, -1, block_bytes)
        if kind in REQUANTIZED_TYPES:
            from gguf.quants import dequantize

            # A few thousand rows at a time: an 8B model's Q6_K LM head dequantized whole would
            # take gigabytes of float32 for a moment.
            parts = []
            for chunk in np.array_split(blocks, max(1, -(-len(blocks) // 4096))):
                dense = dequantize(np.ascontiguousarray(chunk.reshape(len(chunk), -1)), tensor.kind)
                parts.append(quantize_int8_groups(torch.from_numpy(dense.astype(np.float32, copy=False))))
            requantized = GroupQuantized.cat(parts)
            values, scales, offsets = requantized.values.numpy(), requantized.scales.numpy(), None
        else:
            form = _grouped_arrays(kind, blocks)
            if form is None:
                return None
            values, scales, offsets = form
        permuted = tensor.name.endswith(("attn_q.weight", "attn_k.weight"))

        def as_tensor(array: np.ndarray) -> torch.Tensor:
            array = _unpermute(array, self.head_dim) if permuted else array
            return torch.from_numpy(np.ascontiguousarray(array))

        return GroupQuantized(
            as_tensor(values),
            as_tensor(scales),
            None if offsets is None else as_tensor(offsets),
            4 if offsets is not None else 8,
            32,
        )

    def _check_block_aligned(self, tensor, in_cols: int, c0: int, c1: int) -> None:
        block = self._quant_sizes[tensor.kind][0]
        if (c0 % block or c1 % block) and (c0, c1) != (0, in_cols):
            raise ConfigError(
                f"{self.path.name}: tensor {tensor.name!r} ({tensor.kind_name}) would be split at columns "
                f"[{c0}, {c1}), which cuts its quantization blocks of {block} values; choose a "
                f"tensor-parallel degree that divides {in_cols // block} blocks"
            )

    def unexpected(self) -> list[str]:
        return sorted(n for n in self._tensors if n not in self.consumed)

    def close(self) -> None:
        self._reader = None  # (release_readers lets go of the parse itself)


def _hf_name(gguf_name: str) -> str | None:
    """token_embd.weight -> model.embed_tokens.weight, blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight;
    None for tensors without a Hugging Face counterpart that this reader skips."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return gguf_name  # unknown: kept, so check_all_consumed names it
