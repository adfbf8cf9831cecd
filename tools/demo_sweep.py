#!/usr/bin/env python3
"""Render demo-world prompts over several seeds with `longtake render` and score each with `longtake
analyze`: the figures of the demo model's MEASUREMENTS.md tables, one row per prompt and seed, and how many
renders meet the acceptance bar (tests/demo_model.rs): the named background and an object of the named
colour in at least 90 % of the frames, the named motion in at least 75 % of the steps, and no larger
step of the object's track at a window boundary than inside a window.

    .venv/bin/python tools/demo_sweep.py --set held-out --seeds 1 2
    .venv/bin/python tools/demo_sweep.py --set readme --seeds 1-6 -- --stitching codenoise --overlap 8
    .venv/bin/python tools/demo_sweep.py --set pairs --seeds 1
    .venv/bin/python tools/demo_sweep.py --set select --seeds 1-2 -- --model target/demo-train/out
    .venv/bin/python tools/demo_sweep.py --prompt "a red circle moves left on a blue background" --seeds 1-4

Arguments after `--` go to every `longtake render` (sampler flags, --model). Each render's directory is
removed once analyzed. A cell reads "background / object colour / named motion (%) / object extent
w×h (px)", with "/ jump" when the track steps further at a boundary than inside, in bold when short of
the bar. Progress goes to stderr; the table to stdout; --json FILE keeps every render's scene measures.
Needs only the standard library (tools/scenes.py for the held-out list)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

# The six prompts of the demo model's MEASUREMENTS.md tables: the acceptance test's four, then two training scenes.
README_PROMPTS = [
    "a yellow square moves right on a green background",
    "a red circle moves left on a blue background",
    "a blue square moves down on a yellow background",
    "a green circle stays still on a red background",
    "a white circle moves up on a black background",
    "a black square moves down on a white background",
]

BAR_COLOUR = 0.90
BAR_MOTION = 0.75


def held_out_prompts() -> list[str]:
    import scenes

    return [scenes.Scene(*key).caption for key in scenes.HELD_OUT_TUPLES]  # in the README's order


def colour_pair_prompts() -> list[str]:
    """Every ordered pair of distinct colours with one shape and motion: the 30 renders that show which
    object / background pairs the model draws (a circle moving down; all but the white circle on red are
    training scenes)."""
    import scenes

    return [f"a {o} circle moves down on a {b} background" for o in scenes.COLOURS for b in scenes.COLOURS if o != b]


def select_prompts() -> list[str]:
    """The held-out scenes with the other shape: twelve training scenes with the held-out scenes' colour
    pairs and motions, so they fail in the same ways. A set of its own for choosing among runs, seeds or
    sampler settings; choosing by the held-out renders would choose on the renders that measure the model."""
    import scenes

    other = {"circle": "square", "square": "circle"}
    return [scenes.Scene(o, other[s], b, m).caption for o, s, b, m in scenes.HELD_OUT_TUPLES]


# --set NAME -> its prompts.
SETS = {"held-out": held_out_prompts, "readme": lambda: README_PROMPTS, "pairs": colour_pair_prompts,
        "select": select_prompts}


def seeds_arg(text: list[str]) -> list[int]:
    """'1 2 5' or '1-6' (or a mix) -> the seeds."""
    out = []
    for part in text:
        lo, _, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise SystemExit(f"--seeds: {part!r} is not a seed or a range of seeds (e.g. 3 or 1-6)")
    return out


def meets_bar(s: dict) -> bool:
    return (s["background_frac"] >= BAR_COLOUR and s["object_frac"] >= BAR_COLOUR
            and s["motion_frac"] >= BAR_MOTION and s["continuous"])


def cell(s: dict) -> str:
    w, h = s["median_extent"]
    text = (f"{100 * s['background_frac']:.0f} / {100 * s['object_frac']:.1f} / {100 * s['motion_frac']:.1f}"
            f" / {w:.0f}×{h:.0f}" + ("" if s["continuous"] else " / jump"))
    return text if meets_bar(s) else f"**{text}**"


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.strip()}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--longtake", default=str(REPO / "target" / "release" / "longtake"),
                    help="the longtake binary (default: the release build)")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--set", choices=list(SETS), default="held-out",
                      help="held-out: the 12 scenes of HELD_OUT_TUPLES; readme: the six prompts of the model "
                           "README; pairs: a circle moving down over all 30 pairs of distinct colours; "
                           "select: the held-out scenes with the other shape (training scenes), for choosing "
                           "among runs or settings (default: held-out)")
    what.add_argument("--prompt", action="append", help="a prompt (repeatable) instead of a set")
    ap.add_argument("--seeds", nargs="+", default=["1", "2"], help="seeds: numbers or ranges, e.g. 1 2 or 1-6")
    ap.add_argument("--duration", default="60", help="seconds per render (default 60)")
    ap.add_argument("--json", help="also write every render's scene measures to this file")
    ap.add_argument("render_args", nargs="*", help="after --: flags for every longtake render")
    args = ap.parse_args()
    if not Path(args.longtake).is_file():
        raise SystemExit(f"--longtake: {args.longtake} does not exist (build it: cargo build --release)")
    prompts = args.prompt or SETS[args.set]()
    seeds = seeds_arg(args.seeds)
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (seed, prompt) in enumerate((s, p) for s in seeds for p in prompts):
            t0 = time.time()
            out = Path(tmp) / str(k)
            rdir = run([args.longtake, "render", "--prompt", prompt, "--duration", args.duration,
                        "--seed", str(seed), "--out", str(out), *args.render_args]).strip().splitlines()[-1]
            report = json.loads(run([args.longtake, "analyze", "--json", rdir]))
            shutil.rmtree(out, ignore_errors=True)
            scene = report.get("scene")
            if scene is None:
                raise SystemExit(f"{prompt!r} is not a prompt of the demo world (analyze found no scene)")
            scene["seconds"] = round(time.time() - t0, 1)
            results[(prompt, seed)] = scene
            print(f"[{k + 1}/{len(seeds) * len(prompts)}] seed {seed} {prompt}: {cell(scene)} "
                  f"({scene['seconds']} s)", file=sys.stderr, flush=True)
    print("| prompt | seed | background / object / motion % / extent px |")
    print("|---|---|---|")
    for prompt in prompts:
        for i, seed in enumerate(seeds):
            print(f"| {prompt if i == 0 else ''} | {seed} | {cell(results[(prompt, seed)])} |")
    ok = sum(meets_bar(s) for s in results.values())
    print(f"\n{ok} of {len(results)} renders meet the bar.")
    # analyze's jump_chance: how often the render would fail the boundary test with hand-overs exactly as
    # rough as the inside of a window (every boundary step joins two latent frames, as a track's largest
    # steps do); summed, how many of these renders would.
    jumps = sum(not s["continuous"] for s in results.values())
    chance = sum(s["jump_chance"] for s in results.values())
    print(f"{jumps} of them step further at a window boundary than inside a window; hand-overs exactly as rough "
          f"as the inside of a window would give about {chance:.1f}.")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(prompt=p, seed=s, **v) for (p, s), v in results.items()],
                                              indent=1))


if __name__ == "__main__":
    main()
