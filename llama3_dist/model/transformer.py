"""The Llama 3 transformer, tensor-parallel, over a paged KV cache (fixed-size blocks).

One forward serves every supported architecture; the differences are config fields:
Granite multipliers, OLMo's non-affine LayerNorm and clip_qkv, Qwen2 biases, Phi-3 fused
weights (split at load), partial rotary (Phi-4-mini), sliding windows (Mistral, Phi-3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels as kernel_dispatch
from ..config import GROUP_SIZES, ConfigError, Llama3Config
from ..kernels import Kernels, cpu, reference
from .checkpoint import TORCH_DTYPES, CheckpointNames, WeightSource
from .layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    Norm,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from .parallel import ParallelContext

logger = logging.getLogger("llama3_dist")


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token of the flat ragged batch sits. N tokens, B sequences."""

    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64: block * block_size + offset; -1 = do not store
    query_start_loc: torch.Tensor  # [B+1] int32 (MAX: input_row_offsets)
    context_lens: torch.Tensor  # [B] int32, cached tokens including this step's
    block_tables: torch.Tensor  # [B, max_blocks] int32
    is_decode: bool  # every sequence has exactly one new token
    # The most new tokens of one sequence, known on the host (sizes the prefill kernel's grid
    # without a device sync); 0 = not given.
    max_query_len: int = 0
    # Whether a token is at a sequence's first position, known on the host (a decode step reads
    # it; from positions when not given: one more tensor operation a step).
    first_position: bool | None = None


@dataclass(slots=True)
class _StackLogits:
    """The logits the fused stack computed in a step, and the normed hidden state they are of.
    Held in this plain object, not in the model's attributes: nn.Module.__setattr__ looks for
    parameters, buffers and modules at every assignment (three a step)."""

    normed: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, config: Llama3Config, parallel: ParallelContext, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.config = config
        self.kernels = kernels
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.attention_bias,
            dtype,
            parallel,
            kernels,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim,
            config.hidden_size,
            config.attention_out_bias,
            dtype,
            parallel,
            kernels,
        )

    def load(self, source: WeightSource, names: CheckpointNames, index: int) -> None:
        self.qkv_proj.load(source, [names.layer_tensor(index, part) for part in ("q_proj", "k_proj", "v_proj")])
        self.o_proj.load(source, names.layer_tensor(index, "o_proj"))

    def forward(
        self,
        hidden: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        config, head_dim, kernels = self.config, self.config.head_dim, self.kernels
        qkv = self.qkv_proj(hidden)
        if config.clip_qkv is not None:
            qkv = qkv.clamp(-config.clip_qkv, config.clip_qkv)
        q, k, v = qkv.split(
            [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim], dim=-1
        )
        q = q.view(-1, self.num_heads, head_dim)
        k, v = k.view(-1, self.num_kv_heads, head_dim), v.view(-1, self.num_kv_heads, head_dim)
        kernels.rotary_embedding(meta.positions, q, k, cos_sin, config.interleaved_rope_weights)
        k_cache, v_cache = kv_cache
        kernels.store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            out = kernels.paged_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.context_lens,
                config.attention_multiplier,
                config.sliding_window,
            )
        else:
            out = kernels.prefill_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.context_lens,
                config.attention_multiplier,
                config.sliding_window,
                meta.max_query_len or None,
            )
        return self.o_proj(out.reshape(-1, self.num_heads * head_dim))


class MLP(nn.Module):
    def __init__(self, config: Llama3Config, parallel: ParallelContext, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, config.intermediate_size, config.mlp_bias, dtype, parallel, kernels
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, config.mlp_bias, dtype, parallel, kernels
        )

    def load(self, source: WeightSource, names: CheckpointNames, index: int) -> None:
        self.gate_up_proj.load(source, [names.layer_tensor(index, part) for part in ("gate_proj", "up_proj")])
        self.down_proj.load(source, names.layer_tensor(index, "down_proj"))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_and_mul(self.gate_up_proj(hidden)))


class DecoderLayer(nn.Module):
    def __init__(self, config: Llama3Config, parallel: ParallelContext, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.config = config
        self.parallel = parallel

        def norm() -> Norm:
            return Norm(
                config.hidden_size,
                config.rms_norm_eps,
                config.norm_method,
                config.norm_elementwise_affine,
                dtype,
                kernels,
            )

        self.input_layernorm = norm()
        self.self_attn = Attention(config, parallel, dtype, kernels)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(config, parallel, dtype, kernels)
        self.residual_multiplier = config.residual_multiplier

    def load(self, source: WeightSource, names: CheckpointNames, index: int) -> None:
        self.input_layernorm.load(source, f"{names.layer_tensor(index, 'input_norm')}.weight")
        self.self_attn.load(source, names, index)
        self.post_attention_layernorm.load(source, f"{names.layer_tensor(index, 'post_attention_norm')}.weight")
        self.mlp.load(source, names, index)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        cos_sin: torch.Tensor,
    ):
        """x is the previous layer's (scaled) output, not yet added to the residual stream."""
        hidden, residual = self.input_layernorm(x, residual)
        x = self._scaled(self.self_attn(hidden, meta, kv_cache, cos_sin))
        hidden, residual = self.post_attention_layernorm(x, residual)
        return self._scaled(self.mlp(hidden)), residual

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.residual_multiplier == 1.0 else x * self.residual_multiplier

    def fused_decode(self, library: cpu.KernelLibrary, block_size: int) -> cpu.FusedDecodeLayer | None:
        """This layer as two calls of the compiled CPU library (decode steps), or None where the
        fused halves do not cover its architecture: LayerNorm (OLMo), clip_qkv, residual
        multipliers (Granite), o_proj or down_proj biases (added after the all-reduce)."""
        config, attention, mlp = self.config, self.self_attn, self.mlp
        if (
            config.norm_method != "rms_norm"
            or config.clip_qkv is not None
            or self.residual_multiplier != 1.0
            or attention.o_proj.bias is not None
            or mlp.down_proj.bias is not None
            # the fused halves read dense weights or the integer GEMV's panels (bfloat16)
            or any(p.weight_scale is not None for p in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj))
            or mlp.down_proj.weight_scale is not None
        ):
            return None

        def weight(projection):
            return projection.weight if projection.grouped is None else projection.grouped

        try:
            return cpu.FusedDecodeLayer(
                library,
                input_norm=self.input_layernorm.weight,
                qkv=weight(attention.qkv_proj),
                qkv_bias=attention.qkv_proj.bias,
                o_proj=weight(attention.o_proj),
                post_norm=self.post_attention_layernorm.weight,
                gate_up=weight(mlp.gate_up_proj),
                gate_up_bias=mlp.gate_up_proj.bias,
                down=weight(mlp.down_proj),
                heads=attention.num_heads,
                kv_heads=attention.num_kv_heads,
                head_dim=config.head_dim,
                rotary_dim=config.rotary_dim,
                interleaved=config.interleaved_rope_weights,
                block_size=block_size,
                sliding_window=config.sliding_window,
                eps=config.rms_norm_eps,
                scale=config.attention_multiplier,
            )
        except ValueError:
            return None

    def forward_fused(
        self,
        fused: cpu.FusedDecodeLayer,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        step: cpu.DecodeStep,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ):
        """forward() for a decode step, each half one library call (bit-identical to forward())."""
        out, residual = fused.attention(x, residual, step, *kv_cache)
        out, residual = fused.mlp(self.parallel.all_reduce(out), residual)
        return self.parallel.all_reduce(out), residual


class Llama3Transformer(nn.Module):
    """This rank's shard of the whole model. forward -> (final hidden before norm, after norm).

    The kernels are chosen once, for `device` and the model's dtype (kernels.select)."""

    def __init__(self, config: Llama3Config, parallel: ParallelContext, device: torch.device | str):
        super().__init__()
        dtype = TORCH_DTYPES[config.dtype]
        self.config = config
        self.kernels = kernels = kernel_dispatch.select(device, dtype)
        self._fused: list[cpu.FusedDecodeLayer] | None = None  # built at the first fused decode step
        # The fused layers in one call where nothing is all-reduced between halves (one rank).
        self._fused_stack: cpu.FusedDecodeStack | None = None
        # The logits the fused stack computed with the step's normed hidden state: compute_logits
        # returns them for that very tensor (every row of a decode step).
        self._stack_logits = _StackLogits()
        self._one_rank = parallel.world_size == 1
        with torch.device(device):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, parallel)
            # decoder_layers: the same modules, typed (iterating the ModuleList gives nn.Module)
            self.decoder_layers = [
                DecoderLayer(config, parallel, dtype, kernels) for _ in range(config.num_hidden_layers)
            ]
            self.layers = nn.ModuleList(self.decoder_layers)
            self.norm = Norm(
                config.hidden_size,
                config.rms_norm_eps,
                config.norm_method,
                config.norm_elementwise_affine,
                dtype,
                kernels,
            )
            self.lm_head = ParallelLMHead(self.embed_tokens, config.tie_word_embeddings, kernels)

    def load(self, source: WeightSource, show_progress: bool = False) -> None:
        names = source.names
        self.embed_tokens.load(source, names.embedding)
        layers: Iterable[tuple[int, DecoderLayer]] = enumerate(self.decoder_layers)
        if show_progress:
            from tqdm import tqdm

            layers = tqdm(layers, total=len(self.layers), desc="Loading weights", unit="layer")
        quantization = self.config.quantization
        if quantization == "fp8":
            _check_fp8_device(self.embed_tokens.weight.device)
        for index, layer in layers:
            layer.load(source, names, index)
            # Each layer quantized as soon as it is read: the load never holds more than one
            # layer of the checkpoint's dtype beside the quantized ones (an 8B model in bfloat16
            # is 16 GB; its int4 form ~4.5 GB).
            if quantization is not None:
                _quantize_projections(layer, quantization)
        self.norm.load(source, names.final_norm)
        self.lm_head.load(source, names.lm_head, names.embedding)
        source.check_all_consumed()
        if quantization is not None:
            # The head is the largest single weight a decode step reads (a third of the bytes of
            # the 284M benchmark model in int8), and its errors move every logit: in groups of 32,
            # 6 bits for int4 models (as llama.cpp's Q4_K_M files keep theirs in Q6_K; it costs
            # SmolLM2-135M 1% of perplexity where 4 bits cost 6%), else 8; multiplied with x in 15
            # bits or exact (x's rounding to int8 flips near-ties in the logits). The embedding
            # keeps its dense rows for lookups.
            int4 = quantization in GROUP_SIZES
            in_groups = reference.quantize_int6_groups if int4 else reference.quantize_int8_groups
            self.lm_head.use_grouped(in_groups(self.lm_head.weight.data), head=True)

    def forward(
        self,
        tokens: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        cos_sin: torch.Tensor,
    ):
        stacked = self._stack_logits
        stacked.normed = stacked.logits = None
        residual = None
        # A decode step's rows may be rounded to int8 blocks by the CPU's integer GEMV (only its
        # models round), unless one is a sequence's first position: a 1-token prompt, whose row
        # is a prompt row (see cpu.decode_rows) that every later token reads the keys and values of.
        first_position = meta.first_position
        if meta.is_decode and self.kernels.integer_gemv and first_position is None:
            first_position = bool(meta.positions.min() == 0)
        rounding = meta.is_decode and not (self.kernels.integer_gemv and first_position)
        fused = self._fused_layers(meta, kv_caches, rounding)
        stack = self._fused_stack if fused else None
        # Rows never rounded (a prompt's, or decode-shaped first positions) run in the stack's
        # prompt mode (x exact, no head); first positions also in layers that round nothing.
        prompt = False
        if fused is not None and not rounding:
            if stack is not None and (not meta.is_decode or stack.rounds):
                prompt = True
            elif not meta.is_decode or self._fused_rounds():
                fused = None  # the per-layer halves keep such rows on the per-kernel path
        if fused is not None:
            if meta.is_decode:
                step, keep_alive = cpu.FusedDecodeLayer.step(
                    meta.positions, meta.slot_mapping, meta.block_tables, meta.context_lens, cos_sin
                )
            else:
                step, keep_alive = cpu.FusedDecodeStack.prompt_step(
                    meta.positions, meta.slot_mapping, meta.block_tables, meta.query_start_loc, cos_sin
                )
            if stack is not None:
                out = self._run_stack(stack, step, kv_caches, tokens, prompt)
                if out.logits is not None:
                    stacked.normed, stacked.logits = out.first, out.logits
                if stack.final_norm is not None:  # it ran the final norm too
                    return out.second, out.first  # hidden, normed
                x, residual = out.first, out.second
            else:
                x = self._embed(tokens)
                for layer, fused_layer, kv_cache in zip(self.decoder_layers, fused, kv_caches, strict=True):
                    x, residual = layer.forward_fused(fused_layer, x, residual, step, kv_cache)
            del keep_alive
        else:
            x = self._embed(tokens)
            with cpu.decode_rows(rounding):  # prompt rows are never rounded to int8
                for layer, kv_cache in zip(self.decoder_layers, kv_caches, strict=True):
                    x, residual = layer(x, residual, meta, kv_cache, cos_sin)
        normed, hidden = self.norm(x, residual)
        return hidden, normed

    def _run_stack(
        self,
        stack: cpu.FusedDecodeStack,
        step: cpu.DecodeStep,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        tokens: torch.Tensor,
        prompt: bool = False,
    ) -> cpu.StackOutput:
        """The stack's call for these tokens' rows: it looks them up in the embedding itself where
        it holds the table, else they are embedded here."""
        if stack.embedding is not None:
            return stack(None, step, kv_caches, tokens=tokens, prompt=prompt)
        return stack(self._embed(tokens), step, kv_caches, prompt=prompt)

    def _fused_rounds(self) -> bool:
        """Whether the fused layers (and the stack's head) round x anywhere."""
        if self._fused_stack is not None:
            return self._fused_stack.rounds
        return any(layer.rounds for layer in self._fused or ())

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        return x

    def _fused_layers(
        self, meta: AttentionMetadata, kv_caches, rounding: bool = False
    ) -> list[cpu.FusedDecodeLayer] | None:
        """The layers as fused decode halves when this step can take them, with the compiled CPU
        library, on an architecture it covers: a step of at most GEMV_MAX_ROWS rows (decode rows,
        or prompt rows for the stack's prompt mode), or of more where the stack takes them
        (FusedDecodeStack.takes_rows: as long as the per-kernel path would run the same GEMVs;
        `rounding`: decode rows). Built at the first step that asks (the weights are loaded by
        then)."""
        library = self.kernels.fused_decode
        if library is None:
            return None
        rows = meta.positions.shape[0]
        if self._fused is None:
            block_size = kv_caches[0][0].shape[1]
            layers = [layer.fused_decode(library, block_size) for layer in self.decoder_layers]
            fused = [layer for layer in layers if layer is not None]
            self._fused = fused if len(fused) == len(layers) else []  # all or none
            if self._fused and self._one_rank and self.kernels.fused_stack:
                # The final RMS norm in the same call (one call from Python a step fewer).
                norm = self.norm
                same_dtype = norm.weight is None or norm.weight.dtype == self._fused[0].dtype
                final_norm = (norm.weight, norm.eps) if norm.method == "rms_norm" and same_dtype else None
                head = self.lm_head.projection_weight()
                if final_norm is None or head is None or not cpu.fused_head_serves(head, library, self._fused[0].dtype):
                    head = None
                # The stack looks the step's token rows up itself where they are plain rows of the
                # layers' dtype (no embedding multiplier to apply).
                table = self.embed_tokens.weight
                plain = self.config.embedding_multiplier == 1.0 and table.dtype == self._fused[0].dtype
                self._fused_stack = cpu.FusedDecodeStack(
                    self._fused,
                    final_norm,
                    head,
                    self.lm_head.embedding.vocab_size,
                    embedding=table.data if plain and table.is_contiguous() else None,
                )
        if rows > cpu.GEMV_MAX_ROWS:
            # Many rows in one call (each panel read once for all of them) instead of the
            # per-kernel path, which returns to Python a dozen times a layer. SmolLM2 int4 on Zen
            # 4, per-kernel against one call: decode, ms a step, 9 sequences 12.2-14.1 / 9.5-10.4,
            # 32: 37-45 / 30-37; a prompt's first token, ms, 16 tokens 32-37 / 23-24, 48: 78-104 /
            # 65-67.
            stack = self._fused_stack
            if stack is None or not stack.takes_rows(rows, decode=rounding):
                return None
        return self._fused or None

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor | None:
        stacked = self._stack_logits
        if stacked.logits is not None and stacked.normed is normed:  # the fused stack ran the head already
            logits: torch.Tensor | None = stacked.logits
        else:
            logits = self.lm_head(normed)
        stacked.normed = stacked.logits = None
        if logits is not None and self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits


def _quantize_projections(layer: nn.Module, quantization: str) -> None:
    """The attention and MLP projections of `layer` in the weight-only form `quantization` names."""
    for module in layer.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            if quantization == "int8":
                module.quantize_int8()
            elif quantization == "fp8":
                module.quantize_fp8()
            else:
                module.quantize_int4(GROUP_SIZES[quantization])


def _check_fp8_device(device: torch.device) -> None:
    """FP8 products need FP8 tensor cores on a GPU (compute capability 8.9: Ada, Hopper and later).
    CPUs have none: there the float8 weights are upcast per product (correct, for testing)."""
    if device.type == "cpu":
        logger.warning(
            "quantization='fp8' on a CPU upcasts the float8 weights for every product: several times slower "
            "than bfloat16 (CPUs have no FP8 arithmetic); use 'int8' or 'int4' for speed on CPUs"
        )
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise ConfigError(
                f"quantization='fp8' needs a GPU of compute capability 8.9 or newer (Ada, Hopper); {device} is "
                f"{name} ({capability[0]}.{capability[1]}); use 'int8' or 'int4' there"
            )
