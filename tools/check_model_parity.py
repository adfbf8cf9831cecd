"""Check `longtake model generate` against diffusers' WanPipeline on one model directory (the demo
model by default): both start from the same noise, and the final latents (before de-normalisation)
and the decoded video are compared by relative L2 (latents <= 1e-4, video <= 1e-3).

    .venv/bin/python tools/check_model_parity.py --longtake target/release/longtake \
        [--model model/assets/demo-model] [--prompt "..."] [--num-frames 81] [--seed 0]

Size, steps and guidance default to the model's `longtake.json` (else 64x64, 10 steps, guidance 5).
Exit status 0 when both are within tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_random_configs import GEN_TOLERANCES, read_output, rel_l2, run_longtake  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--longtake", required=True, help="the longtake binary")
    ap.add_argument("--model", type=Path, default=REPO / "model" / "assets" / "demo-model")
    ap.add_argument("--prompt", default="a yellow square moves right on a green background")
    ap.add_argument("--num-frames", type=int, default=81)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from diffusers import WanPipeline

    defaults = {}
    if (a.model / "longtake.json").is_file():
        defaults = json.loads((a.model / "longtake.json").read_text())
    width, height = defaults.get("width", 64), defaults.get("height", 64)
    steps, guidance = defaults.get("steps", 10), float(defaults.get("guidance", 5.0))

    torch.set_num_threads(1)
    pipe = WanPipeline.from_pretrained(str(a.model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pv = pipe.vae
    t_scale = 2 ** sum(pv.config.temperal_downsample)
    s_scale = 2 ** (len(pv.config.dim_mult) - 1)
    shape = [1, pv.config.z_dim, (a.num_frames - 1) // t_scale + 1, height // s_scale, width // s_scale]
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(a.seed))
    with torch.no_grad():
        latents = pipe(prompt=a.prompt, num_frames=a.num_frames, height=height, width=width,
                       num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                       output_type="latent").frames
        mean = torch.tensor(pv.config.latents_mean).view(1, pv.config.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(pv.config.latents_std).view(1, pv.config.z_dim, 1, 1, 1)
        video = pv.decode(latents / inv_std + mean).sample

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({"noise": noise}, str(tmp / "noise.safetensors"))
        run_longtake(a.longtake, ["model", "generate", "--model", str(a.model), "--prompt", a.prompt,
                                  "--num-frames", str(a.num_frames), "--height", str(height), "--width", str(width),
                                  "--steps", str(steps), "--guidance", repr(guidance),
                                  "--noise-file", str(tmp / "noise.safetensors"),
                                  "--output", str(tmp / "out.safetensors")])
        ok = True
        for key, ref in (("latents", latents), ("video", video)):
            got = read_output(tmp / "out.safetensors", key)
            err = rel_l2(got, ref.float())
            tol = GEN_TOLERANCES[key]
            ok &= err <= tol
            print(f"{key}: relative L2 {err:.3e} (tolerance {tol:g}) {'PASS' if err <= tol else 'FAIL'}")
    print(f"{a.model}: {a.prompt!r}, {a.num_frames} frames {width}x{height}, {steps} steps, guidance {guidance}: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
