"""Llama3Config: the model-level configuration, read from a Hugging Face config.json.

Field names follow Modular MAX's `Llama3Config`; semantics follow transformers (the model code
of each architecture there is the reference, and the tests compare against it). Both config
formats are read: transformers 4 files carry
`rope_scaling` plus a top-level `rope_theta`, transformers 5 files carry `rope_parameters`.
"""

from __future__ import annotations

import enum
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GraniteForCausalLM",
    "OlmoForCausalLM",
    "Phi3ForCausalLM",
)
QUANTIZATIONS = (None, "int8", "int4", "int4-g128", "fp8")
# Group sizes of the group-wise quantizations (4 bits, a float16 scale and offset per group).
GROUP_SIZES = {"int4": 32, "int4-g128": 128}
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
DEFAULT_BLOCK_SIZE = 16


class ReturnLogits(str, enum.Enum):
    LAST_TOKEN = "last_token"
    ALL = "all"
    VARIABLE = "variable"


class ReturnHiddenStates(str, enum.Enum):
    NONE = "none"
    LAST = "last"
    ALL = "all"
    ALL_NORMALIZED = "all_normalized"


class ConfigError(ValueError):
    """A checkpoint config or an argument that the engine cannot serve."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Llama3RopeScalingParams(_Frozen):
    """`linear` uses factor only; `llama3` uses all four (transformers'
    `_compute_llama3_parameters`; model/rope.py implements it)."""

    rope_type: Literal["linear", "llama3"] = "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    orig_max_position: int = 8192


class LongRoPEScalingParams(_Frozen):
    short_factor: list[float]
    long_factor: list[float]
    original_max_position: int
    # Multiplies cos and sin; transformers' default is sqrt(1 + ln(f)/ln(orig)) for f > 1.
    attention_factor: float


class KVCacheParams(_Frozen):
    dtype: str
    n_kv_heads: int
    n_kv_heads_per_device: int
    head_dim: int
    num_layers: int
    block_size: int = DEFAULT_BLOCK_SIZE
    n_devices: int = 1

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers and all KV heads (each head counted once)."""
        return 2 * self.num_layers * self.n_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token_per_device(self) -> int:
        return 2 * self.num_layers * self.n_kv_heads_per_device * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_block_per_device(self) -> int:
        return self.block_size * self.bytes_per_token_per_device


def normalize_device(device: str) -> str:
    """ "cpu", "cuda", "cuda:N" or "gpu:N" -> "cpu" / "cuda:N"."""
    if not isinstance(device, str):
        raise ConfigError(f"device {device!r} must be a string: 'cpu', 'cuda', 'cuda:N' or 'gpu:N'")
    d = device.strip().lower()
    if d == "cpu":
        return "cpu"
    kind, _, index = d.partition(":")
    if kind in ("cuda", "gpu") and (index == "" or index.isdigit()):
        return f"cuda:{index or 0}"
    raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'gpu:N'")


class Llama3Config(_Frozen):
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    rope_theta: float
    rope_scaling_params: Llama3RopeScalingParams | None
    max_seq_len: int
    intermediate_size: int
    interleaved_rope_weights: bool = False
    vocab_size: int
    dtype: str
    kv_params: KVCacheParams
    return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN
    norm_method: Literal["rms_norm", "layer_norm"] = "rms_norm"
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    stacked_mlp: bool = False
    stacked_qkv: bool = False
    attention_multiplier: float
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    devices: list[str]
    clip_qkv: float | None = None
    norm_elementwise_affine: bool = True
    longrope_scaling_params: LongRoPEScalingParams | None = None
    logits_scaling: float = 1.0
    return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE
    # Beyond MAX's fields: what the supported architectures need.
    head_dim: int
    architecture: str = "LlamaForCausalLM"
    max_position_embeddings: int
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    attention_out_bias: bool = False  # o_proj bias (Llama with attention_bias; not Qwen2)
    mlp_bias: bool = False
    eos_token_ids: list[int] = []
    bos_token_id: int | None = None
    # Weight-only quantization applied at load to the attention and MLP projections: "int8"
    # (per-output-channel symmetric), "int4" / "int4-g128" (groups of 32 / 128 input features,
    # a float16 scale and offset each), "fp8" (float8_e4m3fn weights with a scale per output
    # channel, activations rounded to float8 per token: W8A8, products by torch._scaled_mm); the
    # LM head becomes 8 bits in groups of 32 (Q8_0's form) in every mode; embeddings and norms
    # keep the model's dtype.
    # None: the checkpoint's weights as they are (GGUF files' quantized types stay
    # quantized where the kernels run them: model/gguf.py's GROUPED_TYPES).
    quantization: str | None = None
    # How the checkpoint itself stores its projections: None (floats); "fp8" (float8_e4m3fn
    # weights with a scale per output channel or per tensor: compressed-tensors' float-quantized
    # format, which vLLM serves, or fbgemm_fp8), dequantized to `dtype` at load; "int4", "int8" or
    # "int4+int8" (integers: compressed-tensors, GPTQ, AWQ; model/packed_int.py), kept packed
    # where the kernels run their form and no quantization is asked for, else dequantized.
    checkpoint_quantization: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Llama3Config:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use one of {DTYPES}")

        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.max_seq_len > self.max_position_embeddings:
            raise ConfigError(
                f"max_seq_len {self.max_seq_len} exceeds the checkpoint's "
                f"max_position_embeddings {self.max_position_embeddings}"
            )
        return self

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def tp_degree(self) -> int:
        return len(self.devices)

    # --- MAX's static helpers -------------------------------------------------------------
    @staticmethod
    def calculate_attention_multiplier(huggingface_config: dict) -> float:
        """The config's attention_multiplier (Granite) if present, else sqrt(1/head_dim)."""
        hf = _as_dict(huggingface_config)
        if hf.get("attention_multiplier") is not None:
            return float(hf["attention_multiplier"])
        return math.sqrt(1.0 / _head_dim(hf))

    @staticmethod
    def get_head_dim_from_config(config: Llama3Config | dict) -> int:
        if isinstance(config, Llama3Config):
            return config.head_dim
        return _head_dim(_as_dict(config))

    @staticmethod
    def get_num_layers(huggingface_config: dict) -> int:
        return int(_as_dict(huggingface_config)["num_hidden_layers"])

    @classmethod
    def construct_kv_params(
        cls, huggingface_config: dict, devices: list[str], cache_dtype: str, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> KVCacheParams:
        hf = _as_dict(huggingface_config)
        n_kv = int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
        tp = len(devices)
        check_tp_degree(int(hf["num_attention_heads"]), n_kv, tp)
        if int(hf.get("intermediate_size") or 0) % tp:
            raise ConfigError(
                f"tensor-parallel degree {tp} does not divide intermediate_size "
                f"{hf['intermediate_size']}: the MLP cannot be split evenly; use fewer devices"
            )
        return KVCacheParams(
            dtype=cache_dtype,
            n_kv_heads=n_kv,
            n_kv_heads_per_device=max(1, n_kv // tp),
            head_dim=_head_dim(hf),
            num_layers=cls.get_num_layers(hf),
            block_size=block_size,
            n_devices=tp,
        )

    @classmethod
    def initialize(
        cls,
        huggingface_config: Any,
        *,
        dtype: str | None = None,
        max_seq_len: int | None = None,
        devices: list[str] | None = None,
        return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN,
        return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
        block_size: int = DEFAULT_BLOCK_SIZE,
        quantization: str | None = None,
    ) -> Llama3Config:
        """Builds the config from a Hugging Face config (dict, PretrainedConfig or directory)."""
        if quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization {quantization!r} is not supported; use one of {QUANTIZATIONS} "
                f"(None: the checkpoint's weights as they are)"
            )
        hf = _as_dict(huggingface_config)
        arch = _architecture(hf)
        devices = [normalize_device(d) for d in (devices or ["cpu"])]
        dtype = _normalize_dtype(dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32")
        max_pos = int(hf.get("max_position_embeddings") or 2048)
        if max_seq_len is not None and max_seq_len > max_pos:
            raise ConfigError(
                f"max_seq_len {max_seq_len} exceeds the checkpoint's "
                f"max_position_embeddings {max_pos}; ask for at most {max_pos}"
            )
        rope = _rope_dict(hf)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"unknown rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling, longrope = None, None
        if rope_type in ("linear", "llama3"):
            scaling = Llama3RopeScalingParams(
                rope_type="linear" if rope_type == "linear" else "llama3",
                factor=rope["factor"],
                low_freq_factor=rope.get("low_freq_factor", 1.0),
                high_freq_factor=rope.get("high_freq_factor", 4.0),
                orig_max_position=rope.get("original_max_position_embeddings", 8192),
            )
        elif rope_type == "longrope":
            orig = int(
                rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos
            )
            factor = rope.get("factor") or max_pos / orig
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
            longrope = LongRoPEScalingParams(
                short_factor=rope["short_factor"],
                long_factor=rope["long_factor"],
                original_max_position=orig,
                attention_factor=attention_factor,
            )
        sliding_window = hf.get("sliding_window")
        if arch == "Qwen2ForCausalLM":
            if hf.get("use_sliding_window"):
                raise ConfigError(
                    "Qwen2 checkpoints with use_sliding_window=true (per-layer sliding "
                    "windows) are not supported; set use_sliding_window to false"
                )
            sliding_window = None
        elif arch not in ("MistralForCausalLM", "Phi3ForCausalLM"):
            sliding_window = None
        if sliding_window is not None and sliding_window >= max_pos:
            sliding_window = None  # a window wider than any sequence changes nothing
        is_olmo = arch == "OlmoForCausalLM"
        is_granite = arch == "GraniteForCausalLM"
        is_phi3 = arch == "Phi3ForCausalLM"
        attention_bias = bool(hf.get("attention_bias", False)) or arch == "Qwen2ForCausalLM"
        eos = hf.get("eos_token_id")
        return cls(
            architecture=arch,
            hidden_size=hf["hidden_size"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            num_hidden_layers=cls.get_num_layers(hf),
            head_dim=_head_dim(hf),
            rope_theta=rope_theta,
            rope_scaling_params=scaling,
            longrope_scaling_params=longrope,
            partial_rotary_factor=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0),
            max_seq_len=max_seq_len or max_pos,
            max_position_embeddings=max_pos,
            intermediate_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            dtype=dtype,
            kv_params=cls.construct_kv_params(hf, devices, dtype, block_size),
            return_logits=return_logits,
            return_hidden_states=return_hidden_states,
            norm_method="layer_norm" if is_olmo else "rms_norm",
            norm_elementwise_affine=not is_olmo,
            rms_norm_eps=1e-5 if is_olmo else hf.get("rms_norm_eps", 1e-6),
            attention_bias=attention_bias,
            attention_out_bias=attention_bias and arch != "Qwen2ForCausalLM",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            stacked_qkv=is_phi3,
            stacked_mlp=is_phi3,
            attention_multiplier=cls.calculate_attention_multiplier(hf),
            embedding_multiplier=hf.get("embedding_multiplier", 1.0) if is_granite else 1.0,
            residual_multiplier=hf.get("residual_multiplier", 1.0) if is_granite else 1.0,
            logits_scaling=hf.get("logits_scaling", 1.0) if is_granite else 1.0,
            clip_qkv=hf.get("clip_qkv") if is_olmo else None,
            sliding_window=sliding_window,
            devices=devices,
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            bos_token_id=hf.get("bos_token_id"),
            quantization=quantization,
            checkpoint_quantization=_checkpoint_quantization(hf),
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_config: Any,
        dtype: str | None = None,
        max_seq_len: int | None = None,
        devices: list[str] | None = None,
        **kwargs: Any,
    ) -> Llama3Config:
        return cls.initialize(path_or_config, dtype=dtype, max_seq_len=max_seq_len, devices=devices, **kwargs)

    def finalize(
        self, *, return_logits: ReturnLogits | None = None, return_hidden_states: ReturnHiddenStates | None = None
    ) -> Llama3Config:
        """The settings only known when the model is built (MAX sets them in place; ours is frozen)."""
        update: dict[str, ReturnLogits | ReturnHiddenStates] = {}
        if return_logits is not None:
            update["return_logits"] = ReturnLogits(return_logits)
        if return_hidden_states is not None:
            update["return_hidden_states"] = ReturnHiddenStates(return_hidden_states)
        return self.model_copy(update=update)


def check_tp_degree(n_heads: int, n_kv_heads: int, tp: int) -> None:
    """Heads must split evenly; KV heads split evenly or replicate (tp a multiple of them)."""
    kv_ok = n_kv_heads % tp == 0 or tp % n_kv_heads == 0
    if tp < 1 or n_heads % tp or not kv_ok:
        valid = [t for t in range(1, n_heads + 1) if n_heads % t == 0 and (n_kv_heads % t == 0 or t % n_kv_heads == 0)]
        raise ConfigError(
            f"tensor-parallel degree {tp} does not divide the heads "
            f"({n_heads} query heads, {n_kv_heads} KV heads); valid degrees: {valid}"
        )


# compressed-tensors' formats that store 8-bit integer weights as int8 tensors (its W8A8 models)
INT8_FORMATS = ("int-quantized", "naive-quantized")


def _checkpoint_quantization(hf: dict[str, Any]) -> str | None:
    """How the checkpoint stores its projections, from its quantization_config: None (floats),
    "fp8" (float 8-bit weights that the loader dequantizes), "int4" / "int8" / "int4+int8" (packed
    integer weights: compressed-tensors' pack- and int-quantized, GPTQ's, AWQ's; model/packed_int.py);
    ConfigError naming any other quantization_config (bitsandbytes, AWQ's GEMV layout, FP8 with
    block scales, ...) instead of a later error about unexpected tensors."""
    qc = hf.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    accepted = (
        "accepted: compressed-tensors FP8 (float 8-bit weights, channel or tensor scales), pack-quantized "
        "integers (4 or 8 bits, group or channel scales: W4A16 / W8A16) and int-quantized 8-bit integers (W8A8, "
        "run weight-only); gptq (4 or 8 bits, checkpoint_format gptq or gptq_v2); awq (4 bits, GEMM version, "
        "zero points); fbgemm_fp8. Other checkpoints load unquantized (then quantization='int8' or 'int4' "
        "quantizes them at load)"
    )
    if method == "fbgemm_fp8":
        return "fp8"
    if method in ("gptq", "awq"):
        bits, layout = qc.get("bits"), qc.get("checkpoint_format") or qc.get("version") or ""
        supported = (
            bits in (4, 8) and layout.lower() in ("", "gptq", "gptq_v2")
            if method == "gptq"
            else bits == 4 and layout.lower() in ("", "gemm") and qc.get("zero_point", True)
        )
        if not supported:
            raise ConfigError(
                f"the checkpoint's {method} quantization_config (bits {bits!r}, format {layout!r}) is not supported; "
                f"{accepted}"
            )
        return f"int{bits}"
    if method != "compressed-tensors":
        raise ConfigError(f"the checkpoint's quantization_config quant_method {method!r} is not supported; {accepted}")
    kinds = set()
    for name, group in (qc.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        kind = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
        packing = group.get("format") or qc.get("format")
        if kind in (("float", 8, "channel"), ("float", 8, "tensor")):
            kinds.add("fp8")
        elif kind[0] == "int" and kind[1] in (4, 8) and kind[2] in ("group", "channel") and packing == "pack-quantized":
            kinds.add(f"int{kind[1]}")
        elif (
            kind[0] == "int" and kind[1] == 8 and kind[2] in ("group", "channel", "tensor") and packing in INT8_FORMATS
        ):
            kinds.add("int8")
        else:
            raise ConfigError(
                f"compressed-tensors config group {name!r} stores weights as type {kind[0]!r}, "
                f"{kind[1]} bits, strategy {kind[2]!r}, format {packing!r}: not supported; {accepted}"
            )
    return "+".join(sorted(kinds)) or None


def _as_dict(config: Any) -> dict:
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, Path)):
        from .model.gguf import find_gguf, gguf_config

        gguf_file = find_gguf(config)
        if gguf_file is not None:
            return gguf_config(gguf_file)
        path = Path(config)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json in {str(path)!r}: expected a Hugging Face checkpoint directory")
        return json.loads(file.read_text())
    if hasattr(config, "to_dict"):  # transformers.PretrainedConfig
        return config.to_dict()
    raise ConfigError(
        f"cannot read a config from {type(config).__name__}: pass a directory, a dict "
        f"or a transformers PretrainedConfig"
    )


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ConfigError(
            f"unsupported architecture {archs or hf.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return supported[0]


def _head_dim(hf: dict) -> int:
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def _rope_dict(hf: dict) -> dict:
    """The rope settings of either format as one flat dict."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported by the Llama 3 architectures")
    return dict(params or hf.get("rope_scaling") or {})


def _normalize_dtype(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        name, name
    )
    if name not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {DTYPES}")
    return name
