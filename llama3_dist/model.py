"""The Llama 3 transformer, tensor-parallel, over a paged KV cache.

One forward serves every supported architecture; the differences are config fields:
Granite multipliers, OLMo's non-affine LayerNorm and clip_qkv, Qwen2 biases, Phi-3 fused
weights (split at load), partial rotary (Phi-4-mini), sliding windows (Mistral, Phi-3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import kernels as kernel_dispatch
from .checkpoint import TORCH_DTYPES, WeightSource
from .config import Llama3Config
from .kernels import Kernels, cpu
from .layers import (MergedColumnParallelLinear, Norm, ParallelLMHead, QKVParallelLinear,
                     RowParallelLinear, VocabParallelEmbedding)
from .parallel import ParallelContext


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token of the flat ragged batch sits. N tokens, B sequences."""
    positions: torch.Tensor        # [N] int64
    slot_mapping: torch.Tensor     # [N] int64, page * page_size + offset
    query_start_loc: torch.Tensor  # [B+1] int32 (input_row_offsets)
    context_lens: torch.Tensor     # [B] int32, cached tokens including this step's
    block_tables: torch.Tensor     # [B, max_pages] int32
    is_decode: bool                # every sequence has exactly one new token


class Attention(nn.Module):
    def __init__(self, c: Llama3Config, pc: ParallelContext, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.c = c
        self.kernels = kernels
        self.qkv_proj = QKVParallelLinear(c.hidden_size, c.head_dim, c.num_attention_heads,
                                          c.num_key_value_heads, c.attention_bias, dtype, pc, kernels)
        self.n_heads, self.n_kv_heads = self.qkv_proj.n_heads, self.qkv_proj.n_kv_heads
        self.o_proj = RowParallelLinear(c.num_attention_heads * c.head_dim, c.hidden_size,
                                        c.attention_out_bias, dtype, pc, kernels)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.qkv_proj.load(source, prefix)
        self.o_proj.load(source, f"{prefix}.o_proj")

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor],
                cos_sin: torch.Tensor) -> torch.Tensor:
        c, d = self.c, self.c.head_dim
        qkv = self.qkv_proj(h)
        if c.clip_qkv is not None:
            qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
        q, k, v = qkv.split([self.n_heads * d, self.n_kv_heads * d, self.n_kv_heads * d], dim=-1)
        q, k, v = q.view(-1, self.n_heads, d), k.view(-1, self.n_kv_heads, d), v.view(-1, self.n_kv_heads, d)
        kernels = self.kernels
        kernels.rotary_embedding(meta.positions, q, k, cos_sin, c.interleaved_rope_weights)
        k_cache, v_cache = kv
        kernels.store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            out = kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                 c.attention_multiplier, c.sliding_window)
        else:
            out = kernels.prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                            meta.context_lens, c.attention_multiplier, c.sliding_window)
        return self.o_proj(out.reshape(-1, self.n_heads * d))


class MLP(nn.Module):
    def __init__(self, c: Llama3Config, pc: ParallelContext, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.gate_up_proj = MergedColumnParallelLinear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, pc,
                                                       kernels)
        self.down_proj = RowParallelLinear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype, pc, kernels)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.gate_up_proj.load(source, prefix)
        self.down_proj.load(source, f"{prefix}.down_proj")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_and_mul(self.gate_up_proj(h)))


class DecoderLayer(nn.Module):
    def __init__(self, c: Llama3Config, pc: ParallelContext, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        norm = dict(hidden=c.hidden_size, eps=c.rms_norm_eps, method=c.norm_method,
                    affine=c.norm_elementwise_affine, dtype=dtype, kernels=kernels)
        self.input_layernorm = Norm(**norm)
        self.self_attn = Attention(c, pc, dtype, kernels)
        self.post_attention_layernorm = Norm(**norm)
        self.mlp = MLP(c, pc, dtype, kernels)
        self.residual_multiplier = c.residual_multiplier

    def load(self, source: WeightSource, prefix: str) -> None:
        self.input_layernorm.load(source, f"{prefix}.input_layernorm")
        self.self_attn.load(source, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(source, f"{prefix}.post_attention_layernorm")
        self.mlp.load(source, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
                kv: tuple[torch.Tensor, torch.Tensor], cos_sin: torch.Tensor):
        """x is the previous layer's (scaled) output, not yet added to the residual stream."""
        h, residual = self.input_layernorm(x, residual)
        x = self._scaled(self.self_attn(h, meta, kv, cos_sin))
        h, residual = self.post_attention_layernorm(x, residual)
        return self._scaled(self.mlp(h)), residual

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.residual_multiplier == 1.0 else x * self.residual_multiplier

    def fused_decode(self, library: cpu.KernelLibrary, c: Llama3Config, page_size: int) -> cpu.FusedDecodeLayer | None:
        """This layer as two calls of the compiled CPU library (decode steps), or None where the
        fused halves do not cover its architecture: LayerNorm (OLMo), clip_qkv, residual
        multipliers (Granite), o_proj or down_proj biases (added after the all-reduce)."""
        attention, mlp = self.self_attn, self.mlp
        if (c.norm_method != "rms_norm" or c.clip_qkv is not None or self.residual_multiplier != 1.0
                or attention.o_proj.bias is not None or mlp.down_proj.bias is not None):
            return None
        try:
            return cpu.FusedDecodeLayer(
                library, input_norm=self.input_layernorm.weight, qkv=attention.qkv_proj.weight,
                qkv_bias=attention.qkv_proj.bias, o_proj=attention.o_proj.weight,
                post_norm=self.post_attention_layernorm.weight, gate_up=mlp.gate_up_proj.weight,
                gate_up_bias=mlp.gate_up_proj.bias, down=mlp.down_proj.weight, heads=attention.n_heads,
                kv_heads=attention.n_kv_heads, head_dim=c.head_dim, rotary_dim=c.rotary_dim,
                interleaved=c.interleaved_rope_weights, page_size=page_size, sliding_window=c.sliding_window,
                eps=c.rms_norm_eps, scale=c.attention_multiplier)
        except ValueError:
            return None

    def forward_fused(self, fused: cpu.FusedDecodeLayer, x: torch.Tensor, residual: torch.Tensor | None,
                      step: cpu.DecodeStep, kv: tuple[torch.Tensor, torch.Tensor]):
        """forward() for a decode step, each half one library call (bit-identical to forward())."""
        out, residual = fused.attention(x, residual, step, *kv)
        out, residual = fused.mlp(self.self_attn.o_proj.pc.all_reduce(out), residual)
        return self.mlp.down_proj.pc.all_reduce(out), residual


class Llama3Transformer(nn.Module):
    """This rank's shard of the whole model. forward -> (final hidden before norm, after norm).

    The kernels are chosen once, for `device` and the model's dtype (kernels.select)."""

    def __init__(self, c: Llama3Config, pc: ParallelContext, device: torch.device | str):
        super().__init__()
        dtype = TORCH_DTYPES[c.dtype]
        self.config = c
        self.kernels = kernels = kernel_dispatch.select(device, dtype)
        self._fused: list[cpu.FusedDecodeLayer] | None = None  # built at the first fused decode step
        with torch.device(device):
            self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, dtype, pc)
            self.layers = nn.ModuleList(DecoderLayer(c, pc, dtype, kernels) for _ in range(c.num_hidden_layers))
            self.norm = Norm(c.hidden_size, c.rms_norm_eps, c.norm_method, c.norm_elementwise_affine, dtype, kernels)
            self.lm_head = ParallelLMHead(self.embed_tokens, c.tie_word_embeddings, kernels)

    def load(self, source: WeightSource, show_progress: bool = False) -> None:
        self.embed_tokens.load(source, "model.embed_tokens.weight")
        layers = enumerate(self.layers)
        if show_progress:
            from tqdm import tqdm
            layers = tqdm(layers, total=len(self.layers), desc="Loading weights", unit="layer")
        for i, layer in layers:
            layer.load(source, f"model.layers.{i}")
        self.norm.load(source, "model.norm")
        self.lm_head.load(source, "lm_head.weight")
        source.check_all_consumed()

    def forward(self, tokens: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], cos_sin: torch.Tensor):
        x = self.embed_tokens(tokens)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        residual = None
        fused = self._fused_layers(meta, kv_caches)
        if fused is not None:
            step, keep_alive = cpu.FusedDecodeLayer.step(meta.positions, meta.slot_mapping, meta.block_tables,
                                                         meta.context_lens, cos_sin)
            for layer, fused_layer, kv in zip(self.layers, fused, kv_caches):
                x, residual = layer.forward_fused(fused_layer, x, residual, step, kv)
            del keep_alive
        else:
            for layer, kv in zip(self.layers, kv_caches):
                x, residual = layer(x, residual, meta, kv, cos_sin)
        normed, hidden = self.norm(x, residual)
        return hidden, normed

    def _fused_layers(self, meta: AttentionMetadata, kv_caches) -> list[cpu.FusedDecodeLayer] | None:
        """The layers as fused decode halves when this step can take them: a decode step of at
        most GEMV_MAX_ROWS sequences, with the compiled CPU library, on an architecture it covers.
        Built at the first such step (the weights are loaded by then)."""
        library = self.kernels.fused_decode
        if library is None or not meta.is_decode or meta.positions.shape[0] > cpu.GEMV_MAX_ROWS:
            return None
        if self._fused is None:
            page_size = kv_caches[0][0].shape[1]
            layers = [layer.fused_decode(library, self.config, page_size) for layer in self.layers]
            self._fused = layers if all(layer is not None for layer in layers) else []
        return self._fused or None

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(normed)
        if logits is not None and self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits
