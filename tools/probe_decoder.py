#!/usr/bin/env python3
"""How faithfully a model directory's VAE draws every colour pair of the demo scenes.

For each ordered pair of distinct colours (object, background) a clip of the scene "a <object> <shape>
<motion> on a <background> background" (tools/scenes.py, seeded) goes through diffusers' own
`vae.encode(...).latent_dist.mean` and `vae.decode(...)`, and the scene checker reads the reconstruction:
the share of frames whose object is read in its own colour, the object's fill (mask area over its squared
extent: about 0.785 for a circle, 1 for a square, lower where the edges fray) and the mean L1 per pixel
on [0, 1]. The encoder's latents are the best case for the decoder: a pair it misses here it misses in
every render, whatever the transformer draws.

    .venv/bin/python tools/probe_decoder.py model/assets/demo-model [--frames 33] [--seed 3] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

import scenes
from train_demo import from_pixels, to_pixels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a diffusers Wan2.1 model directory (its vae/ is probed)")
    ap.add_argument("--shape", default="circle", choices=scenes.SHAPES)
    ap.add_argument("--motion", default="down", choices=scenes.MOTIONS)
    ap.add_argument("--frames", type=int, default=33, help="pixel frames per clip (1 + 4k)")
    ap.add_argument("--seed", type=int, default=3, help="seed of the clips' start positions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if (args.frames - 1) % 4:
        raise SystemExit(f"--frames: {args.frames} is not 1 + 4k (the Wan VAE's chunks)")
    vae_dir = Path(args.model) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise SystemExit(f"{args.model}: no vae/config.json (expected a diffusers Wan2.1 model directory)")
    from diffusers import AutoencoderKLWan

    torch.set_num_threads(args.threads)
    vae = AutoencoderKLWan.from_pretrained(str(vae_dir)).eval()
    rows = []
    print("| object | background | object colour right | fill | L1 |")
    print("|---|---|---|---|---|")
    for obj, bg in itertools.permutations(scenes.COLOURS, 2):
        scene = scenes.Scene(obj, args.shape, bg, args.motion)
        x = to_pixels(scenes.render(scene, args.frames, seed=args.seed))[None]
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        seen = scenes.score(scene, from_pixels(y))
        row = dict(caption=scene.caption, object_frac=seen["obj_frac"], fill=seen["fill"],
                   l1=float((y - x).abs().mean() / 2))
        rows.append(row)
        print(f"| {obj} | {bg} | {row['object_frac']:.0%} | {row['fill']:.2f} | {row['l1']:.3f} |", flush=True)
    short = [r for r in rows if r["object_frac"] < 0.9]
    print(f"\n{len(rows) - len(short)} of {len(rows)} pairs read in the object's colour in at least 90 % of the "
          f"frames; mean L1 {np.mean([r['l1'] for r in rows]):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
