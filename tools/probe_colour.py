#!/usr/bin/env python3
"""How much a demo-world model uses the object's colour word, per colour pair and noise level.

    .venv/bin/python tools/probe_colour.py --model model/assets/demo-model --latents target/demo-train/latents.pt

For cached training clips of an (object colour, background colour) pair (`latents.pt` of a train_demo.py
work directory: normalised latents and their captions), the transformer's flow loss on a 9-frame crop
with the true caption against the same caption with each other object colour (same latents, same noise),
at each noise level: "+60" means the wrong word costs 60 % more loss. Where a colour word costs next to
nothing at the highest noise (where a sampler settles what it draws), the model picks the object's colour
there without the text. Prompts go through WanPipeline's text path (train_demo.encode_text: 512 rows)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo as td  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
DEFAULT_PAIRS = ["red/blue", "black/white", "red/green", "green/blue", "yellow/blue", "white/black"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a demo-world WanPipeline directory")
    ap.add_argument("--latents", required=True, help="latents.pt of a train_demo.py work directory")
    ap.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="OBJECT/BACKGROUND colour pairs")
    ap.add_argument("--clips", type=int, default=6, help="clips per pair (default 6)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.8, 0.95], help="noise levels")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    pairs = []
    for p in args.pairs:
        obj, _, bg = p.partition("/")
        if obj not in COLOURS or bg not in COLOURS or obj == bg:
            raise SystemExit(f"--pairs: {p!r} is not OBJECT/BACKGROUND with two different colours of "
                             f"{', '.join(COLOURS)}")
        pairs.append((obj, bg))
    if not all(0 < s < 1 for s in args.sigmas):
        raise SystemExit(f"--sigmas: {args.sigmas} must lie strictly between 0 and 1")

    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.set_num_threads(args.threads)
    model = Path(args.model)
    tok = td.load_tokenizer(model / "tokenizer")
    te = UMT5EncoderModel.from_pretrained(str(model / "text_encoder")).eval()
    dit = WanTransformer3DModel.from_pretrained(str(model / "transformer")).eval()
    data = torch.load(args.latents)
    lat, caps = data["latents"], data["captions"]
    embeds: dict[str, torch.Tensor] = {}

    def embed(caption: str) -> torch.Tensor:
        if caption not in embeds:
            with torch.no_grad():
                embeds[caption] = td.encode_text(tok, te, [caption])
        return embeds[caption]

    print(f"| pair | clips | σ | " + " | ".join(f"{c} word" for c in COLOURS) + " |")
    print("|---|---|---|" + "---|" * len(COLOURS))
    for obj, bg in pairs:
        idx = [i for i, c in enumerate(caps) if c.startswith(f"a {obj} ") and c.endswith(f" {bg} background")]
        idx = idx[:args.clips]
        if not idx:
            raise SystemExit(f"--pairs: no cached clip of a {obj} object on {bg} (held out, or not in --latents)")
        gen = torch.Generator().manual_seed(0)
        for sigma in args.sigmas:
            loss = {c: 0.0 for c in COLOURS if c != bg}
            for i in idx:
                x0 = lat[i:i + 1, :, 10:19]
                noise = torch.randn(x0.shape, generator=gen)
                xt = (1 - sigma) * x0 + sigma * noise
                for word in loss:
                    cap = caps[i].replace(f"a {obj} ", f"a {word} ", 1)
                    with torch.no_grad():
                        v = dit(hidden_states=xt, timestep=torch.tensor([sigma * 1000]),
                                encoder_hidden_states=embed(cap), return_dict=False)[0]
                    loss[word] += float((v - (noise - x0)).pow(2).mean())
            cells = ["–" if c == bg else ("(true)" if c == obj else f"{100 * (loss[c] / loss[obj] - 1):+.1f} %")
                     for c in COLOURS]
            print(f"| {obj} on {bg} | {len(idx)} | {sigma} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
