#!/usr/bin/env python3
"""Write a random-weight Wan transformer and one input, for benchmarks (not committed).

OUT/transformer/{config.json, diffusion_pytorch_model.safetensors}   fp32, ~84 MB
OUT/input.safetensors  hidden_states [1,16,5,16,24] (480 video tokens), timestep [1],
                       encoder_hidden_states [1,512,4096] (first 40 rows random, rest zeros)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_common import randomize_wan_transformer  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("target/bench-model"))
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    from diffusers import WanTransformer3DModel

    out: Path = args.out
    if (out / "transformer").exists():
        shutil.rmtree(out / "transformer")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(**BENCH_CFG).eval()  # fp32 by default
    randomize_wan_transformer(model, args.seed)
    model.save_pretrained(str(out / "transformer"), safe_serialization=True)

    gen = torch.Generator().manual_seed(args.seed + 1)
    hidden = torch.randn(1, 16, 5, 16, 24, generator=gen)
    enc = torch.zeros(1, 512, BENCH_CFG["text_dim"])
    enc[0, :40] = torch.randn(40, BENCH_CFG["text_dim"], generator=gen)
    timestep = torch.tensor([999.0])
    save_file({"hidden_states": hidden, "timestep": timestep, "encoder_hidden_states": enc},
              str(out / "input.safetensors"), metadata={"fixture": '{"real_rows": [40]}'})

    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/transformer ({n_params / 1e6:.1f} M params, fp32) and {out}/input.safetensors")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"  {p.stat().st_size:>11}  {p}")


if __name__ == "__main__":
    main()
