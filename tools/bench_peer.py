#!/usr/bin/env python3
"""Time a diffusers/transformers Wan component on the CPU (fp32), optionally against longtake.

  python tools/bench_peer.py [--component dit] --transformer DIR/transformer --input DIR/input.safetensors
  python tools/bench_peer.py --component vae --vae DIR/vae --input DIR/input.safetensors
  python tools/bench_peer.py --component text --model DIR [--prompt TEXT]
      common: [--threads 2] [--iters 10] [--longtake target/release/longtake] [--json]

dit:  WanTransformer3DModel forward. The FLOP count is analytic (2*M*N*K for every linear and the
      patch-embedding conv, plus the attention products QK^T and PV); element-wise work is not
      counted. longtake is run as `<bin> bench dit --transformer DIR --input IN --iters N`; its last
      output line must read `dit_forward_ms=<median> gflops=<rate>`.
vae:  AutoencoderKLWan.decode(latents) (IN holds `latents`). longtake: `<bin> bench vae --vae DIR
      --input IN --iters N`, last line `vae_ms=<median>`.
text: WanPipeline's prompt encoding: clean, tokenize (padding to 512), UMT5 encode of all 512
      positions with the mask, trim and zero-pad (DIR holds tokenizer/ and text_encoder/).
      longtake: `<bin> bench text --model DIR --prompt TEXT --iters N`, last line `text_ms=<median>`.
The binary runs with RAYON_NUM_THREADS=threads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_common import dit_flops  # noqa: E402

LONGTAKE_RE = re.compile(r"dit_forward_ms=([0-9.eE+-]+)\s+gflops=([0-9.eE+-]+)")
VAE_RE = re.compile(r"vae_ms=([0-9.eE+-]+)")
TEXT_RE = re.compile(r"text_ms=([0-9.eE+-]+)")

DEFAULT_PROMPT = ("A cat and a dog baking a cake together in a kitchen. The cat is carefully measuring flour, "
                  "while the dog is stirring the batter with a wooden spoon. The kitchen is cozy, with "
                  "sunlight streaming through the window.")


def time_calls(fn, iters: int) -> list[float]:
    """One warm-up call, then `iters` timed calls (ms)."""
    import torch

    times = []
    with torch.inference_mode():
        fn()
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_torch_vae(vae_dir: Path, inp: Path, threads: int, iters: int) -> tuple[float, list[float], tuple]:
    import torch
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    vae = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=torch.float32).eval()
    latents = load_file(str(inp))["latents"].to(torch.float32)
    times = time_calls(lambda: vae.decode(latents), iters)
    return statistics.median(times), times, tuple(latents.shape)


def bench_torch_text(model_dir: Path, prompt: str, threads: int, iters: int) -> tuple[float, list[float], int]:
    import torch
    from transformers import AutoTokenizer, UMT5EncoderModel

    from wan_common import wan_prompt_encoder, wan_t5_prompt_embeds

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    te = UMT5EncoderModel.from_pretrained(str(model_dir / "text_encoder"), torch_dtype=torch.float32).eval()
    _, ids, _ = wan_t5_prompt_embeds(tok, te, prompt, 512)
    encode = wan_prompt_encoder(tok, te, 512)
    times = time_calls(lambda: encode(prompt), iters)
    return statistics.median(times), times, len(ids)


def bench_torch(transformer: Path, inp: Path, threads: int, iters: int) -> tuple[float, list[float], dict, tuple]:
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    model = WanTransformer3DModel.from_pretrained(str(transformer), torch_dtype=torch.float32).eval()
    data = load_file(str(inp))
    hidden = data["hidden_states"].to(torch.float32)
    timestep = data["timestep"]
    enc = data["encoder_hidden_states"].to(torch.float32)

    times = []
    with torch.inference_mode():
        model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=enc, return_dict=False)
        for _ in range(iters):
            t0 = time.perf_counter()
            model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=enc, return_dict=False)
            times.append((time.perf_counter() - t0) * 1e3)
    cfg = dict(model.config)
    return statistics.median(times), times, cfg, (tuple(hidden.shape), tuple(enc.shape))


def cpu_busy_fraction(interval: float = 0.5) -> float | None:
    """Fraction of all CPU time that was busy over `interval` seconds (Linux /proc/stat)."""
    def sample():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle
    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def check_binary(binary: str) -> Path:
    path = Path(binary)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise SystemExit(f"error: --longtake {binary!r} is not an executable file (build it first, "
                         f"e.g. cargo build --release)")
    return path


def run_longtake(binary: str, args: list[str], threads: int, pattern: re.Pattern, expected: str) -> re.Match:
    """Run `<binary> bench <args...>` and match `pattern` against the last non-empty output line."""
    path = check_binary(binary)
    cmd = [str(path), "bench", *args]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    print(f"running: RAYON_NUM_THREADS={threads} {shlex.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        raise SystemExit("error: longtake benchmark timed out after 3600 s")
    except OSError as e:
        raise SystemExit(f"error: could not start longtake: {e}")

    def tail(s: str, n: int = 20) -> str:
        return "\n".join(s.strip().splitlines()[-n:])

    if proc.returncode != 0:
        raise SystemExit(f"error: longtake exited with status {proc.returncode}\n"
                         f"--- stdout (tail) ---\n{tail(proc.stdout)}\n--- stderr (tail) ---\n{tail(proc.stderr)}")
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    m = pattern.search(lines[-1]) if lines else None
    if not m:
        raise SystemExit("error: could not parse longtake output; expected a last line "
                         f"'{expected}'\n"
                         f"--- stdout (tail) ---\n{tail(proc.stdout)}\n--- stderr (tail) ---\n{tail(proc.stderr)}")
    return m


def print_comparison(torch_ms: float, lt_ms: float, torch_gflops: float | None = None,
                     lt_gflops: float | None = None) -> float:
    ratio = torch_ms / lt_ms
    print()
    if torch_gflops is None:
        print(f"{'':<10}{'median ms':>12}")
        print(f"{'torch':<10}{torch_ms:>12.2f}")
        print(f"{'longtake':<10}{lt_ms:>12.2f}")
    else:
        print(f"{'':<10}{'median ms':>12}{'GFLOP/s':>10}")
        print(f"{'torch':<10}{torch_ms:>12.2f}{torch_gflops:>10.1f}")
        print(f"{'longtake':<10}{lt_ms:>12.2f}{lt_gflops:>10.1f}")
    print(f"ratio torch_ms/longtake_ms = {ratio:.3f}  (>1 means longtake is faster)")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--component", choices=["dit", "vae", "text"], default="dit")
    ap.add_argument("--transformer", type=Path, help="dit: diffusers transformer directory")
    ap.add_argument("--input", type=Path,
                    help="dit: input.safetensors from make_bench_model.py; vae: a file holding `latents`")
    ap.add_argument("--vae", type=Path, help="vae: diffusers AutoencoderKLWan directory")
    ap.add_argument("--model", type=Path, help="text: a directory with tokenizer/ and text_encoder/")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="text: the prompt (default: a 40-word prompt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--longtake", help="path to the longtake binary to compare against")
    ap.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = ap.parse_args()

    need = {"dit": ("transformer", "input"), "vae": ("vae", "input"), "text": ("model",)}[args.component]
    missing = [f"--{n}" for n in need if getattr(args, n) is None]
    if missing:
        ap.error(f"--component {args.component} needs {' and '.join(missing)}")
    if args.longtake:
        check_binary(args.longtake)  # fail before the (slow) torch part
    busy = cpu_busy_fraction()
    if busy is not None and busy > 0.25:
        print(f"warning: the CPUs were {busy:.0%} busy just before the run; other work on the machine "
              f"makes these timings unreliable (torch's thread pool degrades badly when a core is busy)",
              file=sys.stderr)

    import torch
    summary = {"component": args.component, "threads": args.threads, "iters": args.iters}
    if args.component == "dit":
        torch_ms, times, cfg, (hshape, eshape) = bench_torch(args.transformer, args.input, args.threads,
                                                             args.iters)
        _, _, f, h, w = hshape
        flops = dit_flops(cfg, batch=hshape[0], frames=f, height=h, width=w, text_len=eshape[1])
        torch_gflops = flops / (torch_ms * 1e-3) / 1e9
        print(f"torch {torch.__version__}: threads={args.threads} iters={args.iters} "
              f"median={torch_ms:.2f} ms (min {min(times):.2f}, max {max(times):.2f}) "
              f"flops/forward={flops / 1e9:.3f} GFLOP -> {torch_gflops:.1f} GFLOP/s")
        summary.update(gflop_per_forward=flops / 1e9, torch_ms=torch_ms, torch_gflops=torch_gflops)
        if args.longtake:
            m = run_longtake(args.longtake, ["dit", "--transformer", str(args.transformer), "--input",
                                             str(args.input), "--iters", str(args.iters)],
                             args.threads, LONGTAKE_RE, "dit_forward_ms=<median> gflops=<rate>")
            lt_ms, lt_gflops = float(m.group(1)), float(m.group(2))
            ratio = print_comparison(torch_ms, lt_ms, torch_gflops, lt_gflops)
            summary.update(longtake_ms=lt_ms, longtake_gflops=lt_gflops, ratio=ratio)
    else:
        if args.component == "vae":
            torch_ms, times, shape = bench_torch_vae(args.vae, args.input, args.threads, args.iters)
            what = f"AutoencoderKLWan.decode latents{list(shape)}"
            lt_args = ["vae", "--vae", str(args.vae), "--input", str(args.input), "--iters", str(args.iters)]
            pattern, expected = VAE_RE, "vae_ms=<median>"
        else:
            torch_ms, times, n_tokens = bench_torch_text(args.model, args.prompt, args.threads, args.iters)
            what = f"prompt encoding ({n_tokens} tokens incl. </s>, padded to 512)"
            lt_args = ["text", "--model", str(args.model), "--prompt", args.prompt, "--iters", str(args.iters)]
            pattern, expected = TEXT_RE, "text_ms=<median>"
            summary.update(tokens=n_tokens)
        print(f"torch {torch.__version__}: {what}: threads={args.threads} iters={args.iters} "
              f"median={torch_ms:.2f} ms (min {min(times):.2f}, max {max(times):.2f})")
        summary.update(torch_ms=torch_ms)
        if args.longtake:
            m = run_longtake(args.longtake, lt_args, args.threads, pattern, expected)
            lt_ms = float(m.group(1))
            ratio = print_comparison(torch_ms, lt_ms)
            summary.update(longtake_ms=lt_ms, ratio=ratio)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
