#!/usr/bin/env python3
"""A Wan2.1-1.3B-shaped random-weight transformer at the 480p window, on one GPU: diffusers with
PyTorch SDPA in bf16 and longtake's CUDA backend on the same inputs, both against an f32 reference.

Run by scripts/gpu-check (on a GPU machine with PyTorch; diffusers may come from a wheel):

    python3 tools/gpu_dit_bench.py --work DIR --longtake target/release/longtake

Steps: random weights (seed 0) saved as a diffusers `transformer/` in bf16; inputs of batch 2 (the
conditional and unconditional passes of classifier-free guidance) of 21 x 60 x 104 latents (81
frames at 832 x 480: 32 760 tokens each) with 24 real text rows padded with zeros to 512 (as a
short prompt is); the reference is the same bf16 weights computed in f32 (no TF32); diffusers runs
the bf16 model (SDPA picks its flash kernel); longtake runs `model dit-forward` and
`bench dit` with `--device cuda:0 --precision bf16`. Prints one line per figure and writes
summary.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIG = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
              out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
              added_kv_proj_dim=None, rope_max_seq_len=1024)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--longtake", required=True)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--text-rows", type=int, default=24)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    t0 = time.time()
    model = WanTransformer3DModel(**CONFIG).to(torch.bfloat16)
    tdir = work / "transformer"
    model.save_pretrained(str(tdir), safe_serialization=True)
    print(f"weights: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, bf16, "
          f"written in {time.time() - t0:.0f} s", flush=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, a.frames, a.height, a.width, generator=g)
    ts = torch.tensor([500.0, 500.0])
    ctx = torch.zeros(2, 512, 4096)
    ctx[:, :a.text_rows] = torch.randn(2, a.text_rows, 4096, generator=g) * 0.1
    io = work / "io.safetensors"
    save_file({"hidden_states": x.contiguous(), "timestep": ts, "encoder_hidden_states": ctx}, str(io))

    with torch.no_grad():
        ref_model = model.float().to(dev).eval()
        ref = ref_model(hidden_states=x.to(dev), timestep=ts.to(dev), encoder_hidden_states=ctx.to(dev),
                        return_dict=False)[0].float().cpu()
        del ref_model
        torch.cuda.empty_cache()
        m = WanTransformer3DModel.from_pretrained(str(tdir), torch_dtype=torch.bfloat16).to(dev).eval()
        xb, tb, cb = x.to(dev, torch.bfloat16), ts.to(dev), ctx.to(dev, torch.bfloat16)
        out = m(hidden_states=xb, timestep=tb, encoder_hidden_states=cb, return_dict=False)[0]
        torch.cuda.synchronize()
        times = []
        for _ in range(a.iters):
            s = time.time()
            m(hidden_states=xb, timestep=tb, encoder_hidden_states=cb, return_dict=False)
            torch.cuda.synchronize()
            times.append((time.time() - s) * 1e3)
        diffusers_ms = sorted(times)[len(times) // 2]
        diffusers_err = rel_l2(out.float().cpu(), ref)
        del m
        torch.cuda.empty_cache()

    out_file = work / "longtake_out.safetensors"
    common = ["--transformer", str(tdir), "--device", "cuda:0", "--precision", "bf16"]
    r = subprocess.run([a.longtake, "model", "dit-forward", *common, "--input", str(io), "--output", str(out_file)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"longtake model dit-forward failed:\n{r.stderr}")
    from safetensors.torch import load_file
    lt = load_file(str(out_file))["sample"]
    longtake_err = rel_l2(lt, ref)
    r = subprocess.run([a.longtake, "bench", "dit", *common, "--input", str(io), "--iters", str(a.iters)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"longtake bench dit failed:\n{r.stderr}")
    ms = float(re.search(r"dit_forward_ms=([0-9.]+)", r.stdout).group(1))
    gflop = float(re.search(r"\(([0-9.]+) GFLOP per forward\)", r.stderr).group(1))
    tokens = a.frames * (a.height // 2) * (a.width // 2)
    summary = dict(tokens_per_item=tokens, batch=2, gflop_per_forward=gflop,
                   diffusers_ms=diffusers_ms, diffusers_rel_l2=diffusers_err,
                   diffusers_tflops=gflop / diffusers_ms, longtake_ms=ms, longtake_rel_l2=longtake_err,
                   longtake_tflops=gflop / ms)
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"dit 1.3B 480p window: {tokens} tokens x 2, {gflop / 1e3:.0f} TFLOP per forward", flush=True)
    print(f"diffusers bf16 (SDPA): {diffusers_ms:.1f} ms, {gflop / diffusers_ms:.0f} TFLOP/s, "
          f"rel L2 vs f32 {diffusers_err:.2e}")
    print(f"longtake bf16:         {ms:.1f} ms, {gflop / ms:.0f} TFLOP/s, rel L2 vs f32 {longtake_err:.2e}")


if __name__ == "__main__":
    main()
