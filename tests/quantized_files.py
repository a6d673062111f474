"""Quantized checkpoints for the tests, written the way their makers write them:
compressed_checkpoint through compressed-tensors itself (packed_int.save_compressed), and
gptq_or_awq_checkpoint in AutoGPTQ's and AutoAWQ's layouts, packed from the integers as their
QuantLinear.pack and WQLinear_GEMM.from_linear do. Each returns the float32 weights the
checkpoint's integers and scales define, for a transformers reference."""

from __future__ import annotations

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# AutoAWQ's packing order (WQLinear_GEMM.from_linear): a word's value i is output 8 * word + AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def compressed_checkpoint(
    source: str, path, bits: int, symmetric: bool, group_size: int | None, scale_dtype=torch.bfloat16, **kwargs
) -> dict[str, torch.Tensor]:
    """The checkpoint at `source` quantized and saved by compressed-tensors itself
    (packed_int.save_compressed: its config, qparams and compression, as llm-compressor saves
    its models). Returns the float32 weights compressed-tensors' own unpacking gives back
    (w = (q - z) * scale) for the reference."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    from llama3_dist.model.packed_int import save_compressed

    save_compressed(source, path, bits, symmetric, group_size, scale_dtype, **kwargs)
    tensors, weights = load_file(f"{path}/model.safetensors"), {}
    for name in [n for n in tensors if f"{n}_scale" in tensors or n.endswith(".weight_packed")]:
        name = name.removesuffix("_packed")
        scale = tensors[f"{name}_scale"].float()
        if f"{name}_packed" in tensors:
            q = unpack_from_int32(tensors[f"{name}_packed"], bits, tensors[f"{name}_shape"]).float()
        else:
            q = tensors[name].float()  # int-quantized: int8 values as stored
        size = q.shape[1] // scale.shape[1]
        if not symmetric:
            zero_shape = torch.Size([q.shape[0], scale.shape[1]])
            zero_point = unpack_from_int32(tensors[f"{name}_zero_point"], bits, zero_shape, packed_dim=0)
            q = q - zero_point.float().repeat_interleave(size, dim=1)
        weights[name] = q * scale.repeat_interleave(size, dim=1)
    for name, tensor in tensors.items():
        if name.endswith(("weight", "bias")) and name not in weights:
            weights[name] = tensor.float()
    return weights


def _packed_words(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """values [r, c] (unsigned, < 2^bits) -> int32 words [r, c * bits / 32] along the last dim, value
    i of a word at bits [i * bits, (i + 1) * bits): column per_word * w + order[i] (in order if None),
    as AutoGPTQ's QuantLinear.pack and AutoAWQ's WQLinear_GEMM.from_linear write them."""
    per_word = 32 // bits
    grouped = values.long().reshape(values.shape[0], -1, per_word)
    if order is not None:
        grouped = grouped[..., list(order)]
    words = (grouped << (torch.arange(per_word) * bits)).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def gptq_or_awq_checkpoint(
    source: str,
    path,
    method: str,
    bits: int,
    symmetric: bool,
    group_size: int,
    desc_act=False,
    checkpoint_format="gptq",
) -> dict[str, torch.Tensor]:
    """The checkpoint at `source` with its projections quantized round-to-nearest and written in
    AutoGPTQ's (method "gptq": qweight packed along the inputs, qzeros along the outputs holding
    zero - 1 in checkpoint_format "gptq", g_idx) or AutoAWQ's GEMM layout (method "awq": both packed
    along the outputs in AWQ's order); desc_act: the columns' groups in a random order (GPTQ's
    activation order). Returns the float32 weights (q - zero) * scale for the reference, computed
    from the integers, not from the packing."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, path)
    tensors, weights = load_file(f"{path}/model.safetensors"), {}
    generator = torch.Generator().manual_seed(bits * 1000 + group_size)
    for name in [n for n in tensors if n.rsplit(".", 2)[-2] in PROJECTIONS]:
        weight = tensors.pop(name)
        rows, cols = weight.shape
        groups = cols // group_size
        g_idx = torch.arange(cols) // group_size
        if desc_act:
            g_idx = g_idx[torch.randperm(cols, generator=generator)]
        members = torch.stack([torch.nonzero(g_idx == g).flatten() for g in range(groups)])  # [groups, group_size]
        w = weight[:, members]  # [rows, groups, group_size]
        top = (1 << bits) - 1
        if symmetric:
            scale = (w.abs().amax(dim=2) / (top // 2)).half().float()
            zero = torch.full_like(scale, (top + 1) // 2, dtype=torch.long)
        else:
            low, high = w.amin(dim=2).clamp(max=0), w.amax(dim=2).clamp(min=0)
            scale = ((high - low) / top).half().float()
            zero = torch.round(-low / scale).long().clamp(0, top)
        q = (torch.round(w / scale[:, :, None]) + zero[:, :, None]).clamp(0, top).long()
        dense = torch.empty(rows, cols)
        dense[:, members] = (q - zero[:, :, None]).float() * scale[:, :, None]
        weights[name] = dense
        values = torch.empty(rows, cols, dtype=torch.long)
        values[:, members] = q
        prefix = name.removesuffix(".weight")
        tensors[f"{prefix}.scales"] = scale.T.half().contiguous()
        if method == "gptq":
            stored_zero = zero - 1 if checkpoint_format == "gptq" else zero
            tensors[f"{prefix}.qweight"] = _packed_words(values, bits).T.contiguous()  # [cols * bits / 32, rows]
            tensors[f"{prefix}.qzeros"] = _packed_words(stored_zero.T.contiguous(), bits)
            tensors[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        else:
            tensors[f"{prefix}.qweight"] = _packed_words(values.T.contiguous(), bits, AWQ_ORDER)
            tensors[f"{prefix}.qzeros"] = _packed_words(zero.T.contiguous(), bits, AWQ_ORDER)
    for name, tensor in tensors.items():
        if name.endswith(("weight", "bias")):
            weights[name] = tensor.float()
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": symmetric,
         "checkpoint_format": checkpoint_format}
        if method == "gptq"
        else {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm"}
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return weights
