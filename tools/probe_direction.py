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

A second table compares the model's clean-clip prediction x0_hat = x_t - sigma * v at high noise with
what the noisy input allows: the posterior mean of the clip over its 64 whole-cell shifts (the scenes
wrap, so a rolled latent clip is the same scene elsewhere; the input is scored against each shift
with the Gaussian likelihood of x_t). Where the posterior already picks one shift (its largest weight
near 1) the trajectory is decided by the input, and a model that predicts far worse than that there is
not reading it. "blur" is the per-channel mean of the clip over space, what a model that finds no
object predicts.
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
        print(f"{sigma:>6} {true:>8.4f} {gain([loss[td.OPPOSITE[m]][k] for k, m in enumerate(motions)]):>9} "
              f"{gain([(loss[PERPENDICULAR[m][0]][k] + loss[PERPENDICULAR[m][1]][k]) / 2 for k, m in enumerate(motions)]):>14} "
              f"{gain([loss['still'][k] for k in range(len(motions))]):>7}", flush=True)
    high_noise_table(tok, te, dit, x0, [caps[i] for i in idx], gen)


def shift_posterior(x0: torch.Tensor, xt: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean of x0 [B,C,T,H,W] over its H*W whole-cell rolls given x_t, and the largest weight."""
    h, w = x0.shape[-2:]
    rolls = torch.stack([torch.roll(x0, (dy, dx), dims=(3, 4)) for dy in range(h) for dx in range(w)], 1)
    d = (xt[:, None] - (1 - sigma) * rolls).pow(2).flatten(2).sum(-1)
    weights = torch.softmax(-d / (2 * sigma ** 2), 1)
    return (weights.view(*weights.shape, 1, 1, 1, 1) * rolls).sum(1), weights.max(1).values.mean()


@torch.no_grad()
def high_noise_table(tok, te, dit, x0: torch.Tensor, captions: list[str], gen: torch.Generator) -> None:
    print("clean-clip prediction error at high noise (mean squared, normalised latents):")
    print(f"{'sigma':>6} {'max weight':>10} {'posterior':>10} {'model':>8} {'blur':>8}")
    blur = x0.mean(dim=(3, 4), keepdim=True).expand_as(x0)
    ctx = td.encode_text(tok, te, captions)
    for sigma in (0.99, 0.98, 0.97, 0.95, 0.9):
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma) * x0 + sigma * noise
        post, top = shift_posterior(x0, xt, sigma)
        v = dit(hidden_states=xt, timestep=torch.full((len(x0),), sigma * 1000), encoder_hidden_states=ctx,
                return_dict=False)[0]
        err = lambda p: (p - x0).pow(2).mean().item()  # noqa: E731
        print(f"{sigma:>6} {top:>10.2f} {err(post):>10.4f} {err(xt - sigma * v):>8.4f} {err(blur):>8.4f}", flush=True)


if __name__ == "__main__":
    main()
