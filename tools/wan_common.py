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


def _randn(shape, gen, std: float, mean: float = 0.0) -> torch.Tensor:
    return mean + torch.randn(shape, generator=gen) * std


def randomize_wan_vae(model: torch.nn.Module, seed: int, conv_out_scale: float = 0.5) -> None:
    """Overwrite every parameter of an AutoencoderKLWan with seeded random values.

      * RMS-norm gammas:   1 + N(0, 0.1)
      * biases:            N(0, 0.05)
      * conv weights:      N(0, 1/fan_in), fan_in = in_channels * kernel volume
      * decoder.conv_out.weight is further multiplied by `conv_out_scale`, so that most decoded
        values stay inside the [-1, 1] clamp (with 1.0 about 10% of them would be clamped).
    Parameters are visited in name order so the result only depends on the seed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            shape = tuple(p.shape)
            if leaf == "gamma":
                val = _randn(shape, gen, 0.1, 1.0)
            elif leaf == "bias":
                val = _randn(shape, gen, 0.05)
            elif leaf == "weight" and p.dim() >= 2:
                val = _randn(shape, gen, 1.0 / math.sqrt(math.prod(shape[1:])))
                if name == "decoder.conv_out.weight":
                    val = val * conv_out_scale
            else:
                raise RuntimeError(f"unhandled parameter {name} {shape}")
            p.copy_(val.to(p.dtype))


def randomize_umt5(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter of a transformers UMT5EncoderModel with seeded random values.

      * shared (token embedding):        N(0, 1)
      * relative_attention_bias tables:  N(0, 0.5)
      * layer_norm / final_layer_norm:   1 + N(0, 0.1)
      * linear weights (q, k, v, o, wi_0, wi_1, wo): N(0, 1/fan_in)
    (UMT5 has no biases.) `encoder.embed_tokens` is the same tensor as `shared`.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            shape = tuple(p.shape)
            if name in ("shared.weight", "encoder.embed_tokens.weight"):
                val = _randn(shape, gen, 1.0)
            elif "relative_attention_bias" in name:
                val = _randn(shape, gen, 0.5)
            elif "layer_norm" in name and leaf == "weight":
                val = _randn(shape, gen, 0.1, 1.0)
            elif leaf == "weight" and p.dim() == 2:
                val = _randn(shape, gen, 1.0 / math.sqrt(shape[1]))
            else:
                raise RuntimeError(f"unhandled parameter {name} {shape}")
            p.copy_(val.to(p.dtype))


def umt5_config(vocab_size: int, d_model: int = 32, d_kv: int = 8, num_heads: int = 4, d_ff: int = 64,
                num_layers: int = 2):
    """A UMT5Config like umt5-xxl's (gated-gelu, 32 buckets, max distance 128) at a chosen size."""
    from transformers import UMT5Config

    return UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, num_heads=num_heads, d_ff=d_ff,
                      num_layers=num_layers, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)


def wan_prompt_encoder(tokenizer, text_encoder, max_sequence_length: int = 512):
    """A callable prompt -> prompt_embeds [1, max_len, D] running WanPipeline's own text path
    (`_get_t5_prompt_embeds`: clean, tokenize with padding to max_len, encode with the mask, keep the
    real rows, zero-pad), called unbound on a stand-in object that holds the two components."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    class _Holder:
        _execution_device = torch.device("cpu")

    holder = _Holder()
    holder.tokenizer, holder.text_encoder = tokenizer, text_encoder

    def encode(prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return WanPipeline._get_t5_prompt_embeds(holder, prompt=prompt, max_sequence_length=max_sequence_length,
                                                     device=torch.device("cpu"), dtype=torch.float32)

    return encode


def wan_t5_prompt_embeds(tokenizer, text_encoder, prompt: str, max_sequence_length: int = 512):
    """WanPipeline's text path for one prompt.

    Returns (cleaned prompt, real input ids incl. </s>, prompt_embeds [1, max_len, D]).
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    cleaned = prompt_clean(prompt)
    ids = tokenizer(cleaned, padding="max_length", max_length=max_sequence_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    n = int(ids.attention_mask.sum())
    real_ids = ids.input_ids[0, :n].tolist()
    embeds = wan_prompt_encoder(tokenizer, text_encoder, max_sequence_length)(prompt)
    return cleaned, real_ids, embeds
