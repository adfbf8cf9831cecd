#!/usr/bin/env python3
"""Procedural captioned scenes for the demo model, and a checker that reads them back from video.

A scene is a background of one colour and one object (a circle or a square) of another colour that
moves left, right, up or down at a steady speed, wrapping around at the frame edges, or stays still.
A scene is defined for any number of frames, at 16 fps.

Caption grammar
---------------

    caption    := "a " COLOUR " " SHAPE " " MOTION " on a " COLOUR " background"
    COLOUR     := "red" | "green" | "blue" | "yellow" | "white" | "black"
    SHAPE      := "circle" | "square"
    MOTION     := "moves left" | "moves right" | "moves up" | "moves down" | "stays still"

The first COLOUR is the object's, the second the background's; they differ. Examples:
"a red circle moves left on a blue background", "a white square stays still on a black background".
That makes 6 x 5 x 2 x 5 = 300 scenes (object colour, shape, background colour, motion), of which
the twelve tuples of HELD_OUT_TUPLES are never used for training. Every colour pair, shape and motion
is seen in training, so a held-out scene is a new combination of things the model has seen (a VAE this
small does not reproduce an object/background colour pair it never saw: held out whole, a blue object on
yellow came back dark and desaturated).

Geometry (at the default 64 x 64; everything scales with the frame size): the square's side is
SIZE_FRAC x width (24 px), the circle's diameter the same; a moving object travels SPEED_FRAC x width
per frame (2 px/frame, 32 px/s, one crossing every 2 s, i.e. one 8-px latent cell per 4-frame latent
frame of the Wan VAE); "right" is +x, "down" is +y (image rows).
The object is drawn on a torus (a part that leaves one edge re-enters at the opposite one) with
4 x 4 supersampled coverage, so its edges are anti-aliased and sub-pixel positions are exact. The
initial position is drawn from the clip's seed; a clip of frames [t0, t0 + n) of the same scene is
the same whatever n is.

Colours are pure RGB: red (255,0,0), green (0,255,0), blue (0,0,255), yellow (255,255,0),
white (255,255,255), black (0,0,0).

Usage:
    python tools/scenes.py --out DIR [--n 8] [--frames 81] [--seed 0]   # PNG strips + captions.json
    python tools/scenes.py --check VIDEO.npy --caption "a red circle ..."  # analyse frames [F,H,W,3]

`analyze_frames(frames)` estimates, per frame, the background colour, the object colour, the
object's wrap-aware centroid, and over the clip the motion direction and speed and the shape.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass

import numpy as np

FPS = 16
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square")
MOTIONS = ("left", "right", "up", "down", "still")
# unit velocity (dx, dy) per motion, in image coordinates (y grows downwards)
VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
SIZE_FRAC = 0.375  # side of the square / diameter of the circle, as a fraction of the width
SPEED_FRAC = 2.0 / 64.0  # pixels per frame, as a fraction of the width

# Scenes never used for training (object colour, shape, background colour, motion).
HELD_OUT_TUPLES = [
    ("red", "circle", "blue", "left"),
    ("green", "square", "black", "up"),
    ("white", "circle", "red", "down"),
    ("yellow", "circle", "black", "still"),
    ("black", "square", "white", "right"),
    ("red", "square", "green", "down"),
    ("blue", "circle", "white", "right"),
    ("white", "square", "blue", "left"),
    ("green", "circle", "red", "still"),
    ("yellow", "square", "blue", "up"),
    ("blue", "square", "yellow", "down"),
    ("blue", "circle", "yellow", "left"),
]

WORDS = ["a", "on", "background", "moves", "stays", "still", "left", "right", "up", "down",
         *COLOURS, *SHAPES]


@dataclass(frozen=True)
class Scene:
    obj: str  # object colour
    shape: str
    bg: str  # background colour
    motion: str

    @property
    def caption(self) -> str:
        verb = "stays still" if self.motion == "still" else f"moves {self.motion}"
        return f"a {self.obj} {self.shape} {verb} on a {self.bg} background"

    def key(self) -> tuple[str, str, str, str]:
        return (self.obj, self.shape, self.bg, self.motion)


def all_scenes() -> list[Scene]:
    return [Scene(o, s, b, m) for o in COLOURS for s in SHAPES for b in COLOURS if b != o for m in MOTIONS]


def is_held_out(scene: Scene) -> bool:
    return scene.key() in HELD_OUT_TUPLES


def train_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_held_out(s)]


def held_out_scenes() -> list[Scene]:
    return [s for s in all_scenes() if is_held_out(s)]


def parse_caption(caption: str) -> Scene:
    """Inverse of Scene.caption (raises ValueError for text outside the grammar)."""
    w = caption.strip().split()
    if len(w) == 9 and w[0] == "a" and w[6] == "a" and w[5] == "on" and w[8] == "background":
        if w[3] == "moves" and w[4] in MOTIONS[:4]:
            motion = w[4]
        elif w[3:5] == ["stays", "still"]:
            motion = "still"
        else:
            raise ValueError(f"bad motion in {caption!r}")
        if w[1] in COLOURS and w[7] in COLOURS and w[1] != w[7] and w[2] in SHAPES:
            return Scene(w[1], w[2], w[7], motion)
    raise ValueError(f"caption outside the grammar: {caption!r}")


def render(scene: Scene, num_frames: int, height: int = 64, width: int = 64, seed: int = 0,
           t0: int = 0) -> np.ndarray:
    """Frames t0 .. t0+num_frames-1 of the scene as uint8 [F, H, W, 3]. The seed picks the start position."""
    rng = random.Random(seed)
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    size = SIZE_FRAC * width
    speed = SPEED_FRAC * width
    vx, vy = VELOCITY[scene.motion]
    ss = 4  # supersampling per axis
    sub = (np.arange(ss) + 0.5) / ss
    ys = (np.arange(height)[:, None] + sub[None, :]).reshape(-1)  # [H*ss]
    xs = (np.arange(width)[:, None] + sub[None, :]).reshape(-1)
    bg = np.array(COLOURS[scene.bg], np.float32)
    fg = np.array(COLOURS[scene.obj], np.float32)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        t = t0 + i
        cx, cy = x0 + vx * speed * t, y0 + vy * speed * t
        dx = (xs - cx + width / 2) % width - width / 2  # toroidal offsets
        dy = (ys - cy + height / 2) % height - height / 2
        if scene.shape == "square":
            inside = (np.abs(dy)[:, None] <= size / 2) & (np.abs(dx)[None, :] <= size / 2)
        else:
            inside = dy[:, None] ** 2 + dx[None, :] ** 2 <= (size / 2) ** 2
        cov = inside.reshape(height, ss, width, ss).mean(axis=(1, 3)).astype(np.float32)[..., None]
        out[i] = np.rint(bg * (1 - cov) + fg * cov).astype(np.uint8)
    return out


def sample_clip(rng: random.Random, num_frames: int, scenes: list[Scene] | None = None, height: int = 64,
                width: int = 64) -> tuple[Scene, np.ndarray]:
    """A random scene (from `scenes`, default the training set) and a random-phase clip of it."""
    scene = rng.choice(scenes if scenes is not None else train_scenes())
    return scene, render(scene, num_frames, height, width, seed=rng.getrandbits(32))


# --------------------------------------------------------------------------------------------
# Analysis of decoded video

_PALETTE = np.array(list(COLOURS.values()), np.float32) / 255.0
_NAMES = list(COLOURS)


def nearest_colour(rgb) -> str:
    """Name of the palette colour nearest to rgb (floats in [0, 1])."""
    d = ((_PALETTE - np.asarray(rgb, np.float32)[None, :]) ** 2).sum(1)
    return _NAMES[int(d.argmin())]


def _circular_mean(coord: np.ndarray, weight: np.ndarray, period: int) -> float:
    ang = 2 * math.pi * coord / period
    s, c = float((np.sin(ang) * weight).sum()), float((np.cos(ang) * weight).sum())
    return (math.atan2(s, c) / (2 * math.pi) * period) % period


def analyze_frames(frames, still_speed: float = 0.25) -> dict:
    """Estimate what a clip shows. frames: [F, H, W, 3], uint8 or floats in [0, 1].

    Per frame: the background colour (the palette colour nearest to the median pixel), the object mask
    (pixels farther than 0.35 in RGB distance from the frame's median colour), the object colour (nearest
    palette colour to the mask's median) and the object's centroid (a circular mean per axis, so an object
    that straddles an edge is located correctly; NaN when the mask has fewer than 4 pixels).
    Over the clip: per-step displacements wrapped to [-W/2, W/2) and [-H/2, H/2), their median (dx, dy)
    in px/frame, the motion ("still" if the median speed is below still_speed, else the dominant axis'
    sign), the fraction of steps whose displacement agrees with that motion, and the shape (mask area
    over the square of its wrap-aware extent: ~1 for a square, ~pi/4 for a circle; threshold 0.89).
    """
    f = np.asarray(frames)
    if f.dtype == np.uint8:
        f = f.astype(np.float32) / 255.0
    f = f.astype(np.float32)
    n, h, w, _ = f.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bgs, objs, cxs, cys, areas, fills = [], [], [], [], [], []
    for fr in f:
        med = np.median(fr.reshape(-1, 3), axis=0)
        bgs.append(nearest_colour(med))
        dist = np.sqrt(((fr - med[None, None, :]) ** 2).sum(-1))
        mask = dist > 0.35
        area = int(mask.sum())
        areas.append(area)
        if area < 4:
            objs.append(None)
            cxs.append(float("nan"))
            cys.append(float("nan"))
            fills.append(float("nan"))
            continue
        objs.append(nearest_colour(np.median(fr[mask], axis=0)))
        wgt = mask.astype(np.float32)
        cx, cy = _circular_mean(xx, wgt, w), _circular_mean(yy, wgt, h)
        cxs.append(cx)
        cys.append(cy)
        # wrap-aware extent around the centroid
        dx = (xx[mask] - cx + w / 2) % w - w / 2
        dy = (yy[mask] - cy + h / 2) % h - h / 2
        ext = max(dx.max() - dx.min() + 1, dy.max() - dy.min() + 1)
        fills.append(area / ext ** 2)
    cx, cy = np.array(cxs), np.array(cys)
    ddx = (np.diff(cx) + w / 2) % w - w / 2
    ddy = (np.diff(cy) + h / 2) % h - h / 2
    ok = ~(np.isnan(ddx) | np.isnan(ddy))
    if ok.sum() == 0:
        mdx = mdy = float("nan")
        motion, agree = None, 0.0
    else:
        mdx, mdy = float(np.median(ddx[ok])), float(np.median(ddy[ok]))
        if math.hypot(mdx, mdy) < still_speed:
            motion = "still"
            step_ok = np.hypot(ddx[ok], ddy[ok]) < still_speed * 2
        elif abs(mdx) >= abs(mdy):
            motion = "right" if mdx > 0 else "left"
            step_ok = np.sign(ddx[ok]) == np.sign(mdx)
        else:
            motion = "down" if mdy > 0 else "up"
            step_ok = np.sign(ddy[ok]) == np.sign(mdy)
        agree = float(step_ok.mean())
    fill = float(np.nanmedian(fills)) if not np.all(np.isnan(fills)) else float("nan")
    shape = None if math.isnan(fill) else ("square" if fill > 0.89 else "circle")
    return dict(background=bgs, object=objs, cx=cxs, cy=cys, area=areas, dx=mdx, dy=mdy, motion=motion,
                motion_agreement=agree, fill=fill, shape=shape,
                background_mode=max(set(bgs), key=bgs.count),
                object_mode=max(set(o for o in objs if o), key=objs.count) if any(objs) else None)


def score(scene: Scene, frames, speed_tol: float = 0.5) -> dict:
    """Compare a clip with the scene its caption names. Fractions are over frames (colours) or clip-level
    booleans (motion, shape). `speed_ok`: a moving object's median speed within speed_tol of the nominal
    one (SPEED_FRAC x width px/frame)."""
    a = analyze_frames(frames)
    n = len(a["background"])
    w = np.asarray(frames).shape[2]
    bg_ok = sum(b == scene.bg for b in a["background"]) / n
    obj_ok = sum(o == scene.obj for o in a["object"]) / n
    speed = math.hypot(a["dx"], a["dy"]) if a["motion"] else float("nan")
    nominal = 0.0 if scene.motion == "still" else SPEED_FRAC * w
    return dict(caption=scene.caption, bg_frac=bg_ok, obj_frac=obj_ok, motion=a["motion"],
                motion_ok=a["motion"] == scene.motion, motion_agreement=a["motion_agreement"],
                speed=speed, speed_ok=bool(abs(speed - nominal) <= speed_tol * max(nominal, 1.0)),
                shape=a["shape"], shape_ok=a["shape"] == scene.shape, fill=a["fill"])


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write N example clips (PNG strips of every 8th frame) and captions.json")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", help="a .npy of frames [F,H,W,3] to analyse")
    ap.add_argument("--caption", help="with --check: score against this caption")
    args = ap.parse_args()
    if args.check:
        frames = np.load(args.check)
        if args.caption:
            print(json.dumps(score(parse_caption(args.caption), frames)))
        else:
            a = analyze_frames(frames)
            print(json.dumps({k: a[k] for k in ("background_mode", "object_mode", "motion", "dx", "dy",
                                                "motion_agreement", "shape", "fill")}))
        return
    if not args.out:
        ap.error("give --out or --check")
    from pathlib import Path

    from PIL import Image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    caps = []
    for i in range(args.n):
        scene, clip = sample_clip(rng, args.frames, all_scenes(), args.size, args.size)
        strip = np.concatenate(list(clip[::8]), axis=1)
        Image.fromarray(strip).save(out / f"clip_{i:03d}.png")
        s = score(scene, clip)
        caps.append(dict(file=f"clip_{i:03d}.png", caption=scene.caption, held_out=is_held_out(scene), check=s))
        print(scene.caption, "| check:", {k: s[k] for k in ("bg_frac", "obj_frac", "motion", "shape", "speed")})
    (out / "captions.json").write_text(json.dumps(caps, indent=1))


if __name__ == "__main__":
    _main()
