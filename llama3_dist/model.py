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
from .kernels import Kernels
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


class Llama3Transformer(nn.Module):
    """This rank's shard of the whole model. forward -> (final hidden before norm, after norm).

    The kernels are chosen once, for `device` and the model's dtype (kernels.select)."""

    def __init__(self, c: Llama3Config, pc: ParallelContext, device: torch.device | str):
        super().__init__()
        dtype = TORCH_DTYPES[c.dtype]
        self.config = c
        self.kernels = kernels = kernel_dispatch.select(device, dtype)
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
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, meta, kv, cos_sin)
        normed, hidden = self.norm(x, residual)
        return hidden, normed

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(normed)
        if logits is not None and self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits
