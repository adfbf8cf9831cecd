"""Helpers shared by the fixture, benchmark-model and peer-benchmark scripts."""

from __future__ import annotations

import math

import torch


def randomize_wan_transformer(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter of a WanTransformer3DModel with seeded random values.

    Fresh modules have norm weights of exactly 1 and zero biases, which would hide bugs in
    applying them, so everything is replaced:
      * linear / conv weights: N(0, 1/fan_in)   (keeps activations O(1))
      * biases:                N(0, 0.05)
      * norm weights (norm2, norm_q, norm_k, ...): 1 + N(0, 0.1)
      * scale_shift_table:     N(0, 0.1)
    Parameters are visited in name order so the result only depends on the seed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            shape = tuple(p.shape)
            if "scale_shift_table" in name:
                val = torch.randn(shape, generator=gen) * 0.1
            elif "norm" in name and leaf == "weight":
                val = 1.0 + torch.randn(shape, generator=gen) * 0.1
            elif leaf == "bias":
                val = torch.randn(shape, generator=gen) * 0.05
            elif leaf == "weight" and p.dim() >= 2:
                fan_in = math.prod(shape[1:])
                val = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
            else:
                raise RuntimeError(f"unhandled parameter {name} {shape}")
            p.copy_(val.to(p.dtype))


def dit_flops(cfg: dict, batch: int, frames: int, height: int, width: int, text_len: int) -> int:
    """Analytic FLOP count (2*M*N*K per matmul) of one WanTransformer3DModel forward.

    Counts every linear, the patch-embedding conv, and the attention products QK^T and PV.
    Element-wise work (norms, RoPE, softmax, GELU, modulation) is not counted.
    """
    pt, ph, pw = cfg.get("patch_size", (1, 2, 2))
    heads = cfg["num_attention_heads"]
    d = cfg["attention_head_dim"]
    dim = heads * d
    cin = cfg.get("in_channels", 16)
    cout = cfg.get("out_channels") or cin
    ffn = cfg["ffn_dim"]
    text_dim = cfg["text_dim"]
    freq = cfg["freq_dim"]
    layers = cfg["num_layers"]
    length = (frames // pt) * (height // ph) * (width // pw)
    b, s = batch, text_len

    def mm(m: int, n: int, k: int) -> int:
        return 2 * m * n * k

    total = 0
    total += mm(b * length, dim, cin * pt * ph * pw)  # patch embedding
    total += mm(b, dim, freq) + mm(b, dim, dim)  # time MLP
    total += mm(b, 6 * dim, dim)  # time_proj
    total += mm(b * s, dim, text_dim) + mm(b * s, dim, dim)  # text MLP
    per_block = 0
    per_block += 4 * mm(b * length, dim, dim)  # self-attn q, k, v, out
    per_block += 2 * mm(b * heads * length, length, d)  # self-attn QK^T and PV
    per_block += 2 * mm(b * length, dim, dim)  # cross-attn q, out
    per_block += 2 * mm(b * s, dim, dim)  # cross-attn k, v
    per_block += 2 * mm(b * heads * length, s, d)  # cross-attn QK^T and PV
    per_block += mm(b * length, ffn, dim) + mm(b * length, dim, ffn)  # FFN
    total += layers * per_block
    total += mm(b * length, cout * pt * ph * pw, dim)  # proj_out
    return total
