#!/usr/bin/env python3
"""How much a demo-world model uses the motion words of its captions.

For cached training latents (tools/train_demo.py's `latents.pt`) of moving objects, the flow loss at
several noise levels with the true caption against the same caption with the motion replaced by the
opposite direction, a perpendicular one, or "stays still" (same noise, same latents). A model that
takes the direction from the text predicts better with the true caption: the relative gain is how much
of its loss the word explains. Also prints the cosine similarity of the text encoder's outputs for one
caption with each motion.

    .venv/bin/python tools/probe_direction.py --model model/assets/demo-model \\
        --latents target/demo-train/latents.pt [--clips 16] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenes  # noqa: E402
import train_demo as td  # noqa: E402

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PERPENDICULAR = {"left": ("up", "down"), "right": ("up", "down"), "up": ("left", "right"),
                 "down": ("left", "right")}
SIGMAS = (0.97, 0.9, 0.8, 0.65, 0.5, 0.3)


def with_motion(caption: str, motion: str) -> str:
    s = scenes.parse_caption(caption)
    return scenes.Scene(s.obj, s.shape, s.bg, motion).caption


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--latents", required=True)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.set_num_threads(1)
    model = Path(a.model)
    data = torch.load(a.latents)
    lat, caps = data["latents"], data["captions"]
    tok = td.load_tokenizer(model / "tokenizer")
    te = UMT5EncoderModel.from_pretrained(str(model / "text_encoder")).eval()
    dit = WanTransformer3DModel.from_pretrained(str(model / "transformer")).eval()
    rng = random.Random(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    idx = rng.sample([i for i, c in enumerate(caps) if "moves" in c], a.clips)
    motions = [scenes.parse_caption(caps[i]).motion for i in idx]

    e = td.encode_text(tok, te, [with_motion(caps[idx[0]], m) for m in scenes.MOTIONS])[:, :12].flatten(1)
    e = e / e.norm(dim=1, keepdim=True)
    print("text encoder outputs, cosine similarity of one caption with each motion", scenes.MOTIONS)
    print((e @ e.T).numpy().round(3))

    window = min(td.WINDOW, lat.shape[2] - 5)
    x0 = torch.stack([lat[i, :, 5:5 + window] for i in idx])
    print(f"{a.clips} moving clips, {window} latent frames; relative loss gain of the true motion word over:")
    print(f"{'sigma':>6} {'loss':>8} {'opposite':>9} {'perpendicular':>14} {'still':>7}")
    for sigma in SIGMAS:
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma) * x0 + sigma * noise
        loss = {}
        for m in scenes.MOTIONS:
            ctx = td.encode_text(tok, te, [with_motion(caps[i], m) for i in idx])
            v = dit(hidden_states=xt, timestep=torch.full((len(idx),), sigma * 1000), encoder_hidden_states=ctx,
                    return_dict=False)[0]
            loss[m] = ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3, 4))
        true = torch.stack([loss[m][k] for k, m in enumerate(motions)]).mean()

        def gain(values):
            return f"{(torch.stack(values).mean() - true) / true * 100:+.2f}%"
        print(f"{sigma:>6} {true:>8.4f} {gain([loss[OPPOSITE[m]][k] for k, m in enumerate(motions)]):>9} "
              f"{gain([(loss[PERPENDICULAR[m][0]][k] + loss[PERPENDICULAR[m][1]][k]) / 2 for k, m in enumerate(motions)]):>14} "
              f"{gain([loss['still'][k] for k in range(len(motions))]):>7}", flush=True)


if __name__ == "__main__":
    main()
