#!/usr/bin/env python3
"""Write random-weight Wan components and inputs for benchmarks (not committed).

  --out DIR        transformer (the default when no option is given; DIR defaults to target/bench-model):
                   DIR/transformer/{config.json, diffusion_pytorch_model.safetensors}   fp32, ~85 MB
                   DIR/input.safetensors  hidden_states [1,16,5,16,24] (480 video tokens), timestep [1],
                                          encoder_hidden_states [1,512,4096] (first 40 rows random, rest zeros)
  --vae-out DIR    VAE: DIR/vae/ (AutoencoderKLWan, base_dim 32, dim_mult [1,2,4,4], num_res_blocks 2,
                   z_dim 16; fp32) and DIR/input.safetensors with `latents` [1,16,3,16,16]
  --text-out DIR   text encoder: DIR/text_encoder/ (UMT5EncoderModel, d_model 512, d_kv 64, 8 heads, d_ff 1024,
                   4 layers, fp32) and DIR/tokenizer/ (a copy of the tiny test tokenizer, vocab 400)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_common import randomize_umt5, randomize_wan_transformer, randomize_wan_vae, umt5_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY_TOKENIZER = REPO / "model" / "tests" / "fixtures" / "text" / "tiny" / "tokenizer"

BENCH_CFG = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=8,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=2048,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

BENCH_VAE_CFG = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
BENCH_VAE_LATENTS = [1, 16, 3, 16, 16]

BENCH_TEXT_CFG = dict(d_model=512, d_kv=64, num_heads=8, d_ff=1024, num_layers=4)


def list_files(out: Path) -> None:
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"  {p.stat().st_size:>11}  {p}")


def write_transformer(out: Path, seed: int) -> None:
    from diffusers import WanTransformer3DModel

    if (out / "transformer").exists():
        shutil.rmtree(out / "transformer")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**BENCH_CFG).eval()  # fp32 by default
    randomize_wan_transformer(model, seed)
    model.save_pretrained(str(out / "transformer"), safe_serialization=True)

    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(1, 16, 5, 16, 24, generator=gen)
    enc = torch.zeros(1, 512, BENCH_CFG["text_dim"])
    enc[0, :40] = torch.randn(40, BENCH_CFG["text_dim"], generator=gen)
    timestep = torch.tensor([999.0])
    save_file({"hidden_states": hidden, "timestep": timestep, "encoder_hidden_states": enc},
              str(out / "input.safetensors"), metadata={"fixture": '{"real_rows": [40]}'})

    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/transformer ({n_params / 1e6:.1f} M params, fp32) and {out}/input.safetensors")


def write_vae(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan

    if (out / "vae").exists():
        shutil.rmtree(out / "vae")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**BENCH_VAE_CFG).eval()
    randomize_wan_vae(vae, seed)
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    latents = torch.randn(*BENCH_VAE_LATENTS, generator=torch.Generator().manual_seed(seed + 1))
    save_file({"latents": latents}, str(out / "input.safetensors"))
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"wrote {out}/vae ({n_params / 1e6:.1f} M params, fp32) and {out}/input.safetensors "
          f"(latents {BENCH_VAE_LATENTS})")


def write_text(out: Path, seed: int) -> None:
    from transformers import AutoTokenizer, UMT5EncoderModel

    if not (TINY_TOKENIZER / "tokenizer.json").is_file():
        raise SystemExit(f"{TINY_TOKENIZER} is missing (run tools/make_fixtures.py --only text/tiny)")
    for sub in ("text_encoder", "tokenizer"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(TINY_TOKENIZER, out / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(str(out / "tokenizer")))
    torch.manual_seed(seed)
    te = UMT5EncoderModel(umt5_config(vocab, **BENCH_TEXT_CFG)).eval()
    randomize_umt5(te, seed)
    te.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    n_params = sum(p.numel() for p in te.parameters())
    print(f"wrote {out}/text_encoder ({n_params / 1e6:.1f} M params, fp32) and {out}/tokenizer (vocab {vocab})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="transformer output directory (default: target/bench-model)")
    ap.add_argument("--vae-out", type=Path, help="VAE output directory")
    ap.add_argument("--text-out", type=Path, help="text encoder + tokenizer output directory")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.out is None and args.vae_out is None and args.text_out is None:
        args.out = Path("target/bench-model")

    for out, write in ((args.out, write_transformer), (args.vae_out, write_vae), (args.text_out, write_text)):
        if out is not None:
            write(out, args.seed)
            list_files(out)


if __name__ == "__main__":
    main()
