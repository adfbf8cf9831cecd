#!/usr/bin/env python3
"""Reference loops of longtake's three window-stitching strategies, the oracle for its window code.

Uses the whole-pipeline fixture model/tests/fixtures/pipeline/tiny (read, not copied) and writes
  model/tests/fixtures/codenoise/tiny/{runs.json, run_<k>.safetensors}

The loop, per timestep t: every window's prediction v_w (with classifier-free guidance
uncond + g·(cond − uncond) when g > 1) is computed from the current latents X, the predictions are
blended per latent frame with the plan's normalised weights (summed in window order, starting from
zeros), and ONE scheduler step is taken over the whole sequence. A video that fits in one window
reduces to plain WanPipeline; run 2 checks that against pipeline/tiny run 0.

The same runs are also sampled with the two other strategies, written next to the co-denoised
latents (`latents_independent`, `latents_autoregressive`, and `latents_autoregressive_release`
with `hold_release` halfway between the last two steps' sigmas, recorded in runs.json):
- independent: each window is sampled alone from its slice of the noise with a fresh scheduler;
  the final latents are blended per frame with the same weights (summed in window order from
  zeros).
- autoregressive: windows in order, each with a fresh scheduler; the frames a window shares with
  the previous one are held, before each of its steps, to the previous window's final latents
  re-noised to that step's noise level, (1 - sigma_i) * clean + sigma_i * noise (its own slice of
  the initial noise), and set to the clean latents after its last step; the sequence takes each
  window's latents in order (later windows over earlier ones). With `hold_release` in the run
  (0 unless given), the held frames are not held from the first step whose sigma is at most it,
  and after the last step they are blended, frame j of n, as (1 - a) * clean + a * own with
  a = (j + 1) / (n + 1) (longtake's `--hold-release`).

Everything is seeded and computed in fp32 on the CPU; reruns are byte-identical with the pinned
versions. See tools/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import compact_json, file_sizes, one_key_metadata  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "model" / "tests" / "fixtures"
MODEL = "pipeline/tiny"  # relative to the fixtures root
DEFAULT_OUT = FIXTURES / "codenoise" / "tiny"

PROMPT = "a red fox running through snow"
RUNS = [
    dict(prompt=PROMPT, negative_prompt="blurry", num_frames=25, height=32, width=48, num_inference_steps=3,
         guidance_scale=5.0, window=3, overlap=1, noise_seed=7),
    dict(prompt=PROMPT, negative_prompt="", num_frames=41, height=16, width=32, num_inference_steps=2,
         guidance_scale=1.0, window=4, overlap=2, noise_seed=8),
    # T <= L: one window, i.e. plain WanPipeline; noise and expected latents from pipeline/tiny run 0.
    dict(prompt=PROMPT, negative_prompt="blurry", num_frames=9, height=32, width=48, num_inference_steps=4,
         guidance_scale=5.0, window=21, overlap=4, noise_from=f"{MODEL}/run_0.safetensors"),
]


def window_plan(latent_frames: int, window: int, overlap: int) -> tuple[list[int], int, list[list[float]]]:
    """(starts, window length, normalised weights per window as float64 lists).

    One window [0, T) when T <= L; else starts k·S (S = L − O) while k·S + L < T, then T − L
    (unless equal to the last start). Raw weight 1, ramped down to min(·, (j+1)/(O_l+1)) over the
    overlap with the previous window and min(·, (len−j)/(O_r+1)) over the overlap with the next,
    then divided per frame by the sum over the windows covering it.
    """
    assert latent_frames >= 1 and window >= 1 and 0 <= overlap < window
    if latent_frames <= window:
        starts, length = [0], latent_frames
    else:
        stride = window - overlap
        starts = []
        k = 0
        while k * stride + window < latent_frames:
            starts.append(k * stride)
            k += 1
        if not starts or starts[-1] != latent_frames - window:
            starts.append(latent_frames - window)
        length = window
    raw = []
    for i, s in enumerate(starts):
        left = starts[i - 1] + length - s if i > 0 else 0
        right = s + length - starts[i + 1] if i + 1 < len(starts) else 0
        r = []
        for j in range(length):
            v = 1.0
            if j < left:
                v = min(v, (j + 1) / (left + 1))
            if right > 0 and j >= length - right:
                v = min(v, (length - j) / (right + 1))
            r.append(v)
        raw.append(r)
    total = [0.0] * latent_frames
    for s, r in zip(starts, raw):
        for j, v in enumerate(r):
            total[s + j] += v
    weights = [[v / total[s + j] for j, v in enumerate(r)] for s, r in zip(starts, raw)]
    return starts, length, weights


def codenoise(pipe, run: dict, noise: torch.Tensor) -> dict:
    from diffusers import UniPCMultistepScheduler

    cfg = run["guidance_scale"] > 1.0
    with torch.no_grad():
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            run["prompt"], run["negative_prompt"], do_classifier_free_guidance=cfg, max_sequence_length=512,
            device=torch.device("cpu"), dtype=torch.float32)
    t_lat = noise.shape[2]
    starts, length, w64 = window_plan(t_lat, run["window"], run["overlap"])
    weights = torch.tensor(w64, dtype=torch.float64).to(torch.float32)  # [num_windows, length]

    # A fresh scheduler with the pipeline's config, so no state carries over between runs.
    sched = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(run["num_inference_steps"])
    sched.set_begin_index(0)
    timesteps = sched.timesteps.clone()

    x = noise.clone()
    g = run["guidance_scale"]
    with torch.no_grad():
        for t in timesteps:
            timestep = t.expand(x.shape[0])
            preds = []
            for s in starts:
                xw = x[:, :, s:s + length].contiguous()
                v = pipe.transformer(hidden_states=xw, timestep=timestep, encoder_hidden_states=prompt_embeds,
                                     return_dict=False)[0]
                if cfg:
                    u = pipe.transformer(hidden_states=xw, timestep=timestep,
                                         encoder_hidden_states=negative_embeds, return_dict=False)[0]
                    v = u + g * (v - u)
                preds.append(v)
            fused = torch.zeros_like(x)
            for i, (s, v) in enumerate(zip(starts, preds)):
                fused[:, :, s:s + length] += weights[i].view(1, 1, length, 1, 1) * v
            x = sched.step(fused, t, x, return_dict=False)[0]
    return dict(latents=x, timesteps=timesteps, starts=starts, length=length, weights=weights, cfg=cfg)


def _embeds(pipe, run: dict):
    cfg = run["guidance_scale"] > 1.0
    with torch.no_grad():
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            run["prompt"], run["negative_prompt"], do_classifier_free_guidance=cfg, max_sequence_length=512,
            device=torch.device("cpu"), dtype=torch.float32)
    return cfg, prompt_embeds, negative_embeds


def _velocity(pipe, run: dict, embeds, xw: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    cfg, prompt_embeds, negative_embeds = embeds
    timestep = t.expand(xw.shape[0])
    v = pipe.transformer(hidden_states=xw, timestep=timestep, encoder_hidden_states=prompt_embeds,
                         return_dict=False)[0]
    if cfg:
        u = pipe.transformer(hidden_states=xw, timestep=timestep, encoder_hidden_states=negative_embeds,
                             return_dict=False)[0]
        v = u + run["guidance_scale"] * (v - u)
    return v


def _fresh_scheduler(pipe, steps: int):
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    sched.set_begin_index(0)
    return sched


def independent(pipe, run: dict, noise: torch.Tensor) -> torch.Tensor:
    embeds = _embeds(pipe, run)
    starts, length, w64 = window_plan(noise.shape[2], run["window"], run["overlap"])
    weights = torch.tensor(w64, dtype=torch.float64).to(torch.float32)
    out = torch.zeros_like(noise)
    with torch.no_grad():
        for i, s in enumerate(starts):
            sched = _fresh_scheduler(pipe, run["num_inference_steps"])
            x = noise[:, :, s:s + length].clone()
            for t in sched.timesteps:
                x = sched.step(_velocity(pipe, run, embeds, x, t), t, x, return_dict=False)[0]
            out[:, :, s:s + length] += weights[i].view(1, 1, length, 1, 1) * x
    return out


def autoregressive(pipe, run: dict, noise: torch.Tensor) -> torch.Tensor:
    embeds = _embeds(pipe, run)
    starts, length, _ = window_plan(noise.shape[2], run["window"], run["overlap"])
    # From the first step whose sigma is at most this, the held frames are released (0: held to the end).
    release = float(run.get("hold_release", 0.0))
    out = torch.zeros_like(noise)
    prev = None  # (start, final latents of the previous window)
    with torch.no_grad():
        for s in starts:
            sched = _fresh_scheduler(pipe, run["num_inference_steps"])
            own_noise = noise[:, :, s:s + length].clone()
            x = own_noise.clone()
            held = None
            if prev is not None:
                ps, px = prev
                a, b = max(s, ps), min(s + length, ps + length)
                held = (a - s, b - s, px[:, :, a - ps:b - ps])
            released = False
            for i, t in enumerate(sched.timesteps):
                if held is not None:
                    lo, hi, clean = held
                    sigma = sched.sigmas[i].to(torch.float32)
                    if sigma > release:
                        x[:, :, lo:hi] = (1 - sigma) * clean + sigma * own_noise[:, :, lo:hi]
                    else:
                        released = True
                x = sched.step(_velocity(pipe, run, embeds, x, t), t, x, return_dict=False)[0]
            if held is not None:
                lo, hi, clean = held
                if released:
                    # Blend the shared frames from the previous window's result to this one's.
                    a = (torch.arange(hi - lo, dtype=torch.float32) + 1) / (hi - lo + 1)
                    a = a.view(1, 1, -1, 1, 1)
                    x[:, :, lo:hi] = (1 - a) * clean + a * x[:, :, lo:hi]
                else:
                    x[:, :, lo:hi] = clean
            out[:, :, s:s + length] = x
            prev = (s, x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)
    import diffusers
    from diffusers import WanPipeline

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}; model {MODEL}; writing {args.out}")
    pipe = WanPipeline.from_pretrained(str(FIXTURES / MODEL), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)

    runs_json = []
    for k, run in enumerate(RUNS):
        t_lat = (run["num_frames"] - 1) // 4 + 1
        shape = [1, 16, t_lat, run["height"] // 8, run["width"] // 8]
        expected = None
        if "noise_from" in run:
            ref = load_file(str(FIXTURES / run["noise_from"]))
            noise, expected = ref["noise"], ref["latents"]
            noise_src = {"noise_from": run["noise_from"]}
        else:
            noise = torch.randn(*shape, generator=torch.Generator().manual_seed(run["noise_seed"]),
                                dtype=torch.float32)
            noise_src = {"noise_seed": run["noise_seed"]}
        assert list(noise.shape) == shape, (noise.shape, shape)

        res = codenoise(pipe, run, noise)
        latents = res["latents"]
        check = None
        if expected is not None:
            rel = ((latents.double() - expected.double()).norm() / expected.double().norm()).item()
            if not rel <= 1e-6:
                raise RuntimeError(f"codenoise run {k}: one-window result differs from {run['noise_from']} "
                                   f"latents by rel L2 {rel:.3e}")
            check = {"against": f"{run['noise_from']}: latents", "rel_l2": rel,
                     "bit_exact": bool(torch.equal(latents, expected))}

        # Released for the last step only: halfway between the last two steps' sigmas.
        steps = run["num_inference_steps"]
        sig = _fresh_scheduler(pipe, steps).sigmas
        release = round(float(sig[steps - 1] + sig[steps - 2]) / 2, 6) if steps > 1 else 0.0
        others = {"latents_independent": independent(pipe, run, noise),
                  "latents_autoregressive": autoregressive(pipe, run, noise),
                  "latents_autoregressive_release": autoregressive(pipe, {**run, "hold_release": release}, noise)}
        tensors = {"noise": noise, "latents": latents, **others, "weights": res["weights"],
                   "window_starts": torch.tensor(res["starts"], dtype=torch.float32),
                   "timesteps": res["timesteps"].to(torch.float32)}
        tensors = {kk: v.to(torch.float32).contiguous() for kk, v in tensors.items()}
        save_file(tensors, str(args.out / f"run_{k}.safetensors"),
                  metadata=one_key_metadata({"run": k, "model": MODEL, **noise_src}))

        entry = {"model": MODEL,
                 "args": {kk: run[kk] for kk in ("prompt", "negative_prompt", "num_frames", "height", "width",
                                                 "num_inference_steps", "guidance_scale", "window", "overlap")},
                 **noise_src, "hold_release": release, "max_sequence_length": 512, "cfg": res["cfg"], "latent_shape": shape,
                 "timesteps": [int(t) for t in res["timesteps"].tolist()],
                 "window_starts": res["starts"], "window_len": res["length"],
                 "weights": [[round(v, 9) for v in row] for row in res["weights"].tolist()],
                 "tensors": {kk: list(v.shape) for kk, v in tensors.items()}}
        if check is not None:
            entry["check"] = check
        runs_json.append(entry)
        print(f"codenoise run {k}: T={t_lat} L={run['window']} O={run['overlap']} starts={res['starts']} "
              f"len={res['length']} cfg={res['cfg']} timesteps={entry['timesteps']} "
              f"|latents|max={latents.abs().max().item():.4f}")
        for s, row in zip(res["starts"], res["weights"].tolist()):
            print(f"  window {s:>2}..{s + res['length']:<2} weights " + " ".join(f"{v:.6g}" for v in row))
        if check is not None:
            print(f"  check: equals {run['noise_from']} latents, rel L2 {check['rel_l2']:.3e} "
                  f"(bit-exact: {check['bit_exact']})")
    (args.out / "runs.json").write_text(compact_json(runs_json))

    print("\nfiles written:")
    total = 0
    for rel, size in file_sizes(args.out):
        total += size
        print(f"  {size:>9}  {rel}")
    print(f"  {total:>9}  total bytes")


if __name__ == "__main__":
    main()
