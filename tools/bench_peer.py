#!/usr/bin/env python3
"""Time diffusers' WanTransformer3DModel forward on the CPU (fp32), optionally against longtake.

  python tools/bench_peer.py --transformer DIR/transformer --input DIR/input.safetensors \
      [--threads 2] [--iters 10] [--longtake target/release/longtake]

The FLOP count is analytic (2*M*N*K for every linear and the patch-embedding conv, plus the
attention products QK^T and PV); element-wise work is not counted. With --longtake the binary
is run as `<bin> bench dit --transformer DIR --input IN --iters N` with RAYON_NUM_THREADS set,
and its last output line must read `dit_forward_ms=<median> gflops=<rate>`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_common import dit_flops  # noqa: E402

LONGTAKE_RE = re.compile(r"dit_forward_ms=([0-9.eE+-]+)\s+gflops=([0-9.eE+-]+)")


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


def run_longtake(binary: str, transformer: Path, inp: Path, threads: int, iters: int) -> tuple[float, float]:
    path = check_binary(binary)
    cmd = [str(path), "bench", "dit", "--transformer", str(transformer), "--input", str(inp),
           "--iters", str(iters)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    print(f"running: RAYON_NUM_THREADS={threads} {' '.join(cmd)}", flush=True)
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
    m = LONGTAKE_RE.search(lines[-1]) if lines else None
    if not m:
        raise SystemExit("error: could not parse longtake output; expected a last line "
                         "'dit_forward_ms=<median> gflops=<rate>'\n"
                         f"--- stdout (tail) ---\n{tail(proc.stdout)}\n--- stderr (tail) ---\n{tail(proc.stderr)}")
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transformer", type=Path, required=True, help="diffusers transformer directory")
    ap.add_argument("--input", type=Path, required=True, help="input.safetensors from make_bench_model.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--longtake", help="path to the longtake binary to compare against")
    ap.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = ap.parse_args()

    if args.longtake:
        check_binary(args.longtake)  # fail before the (slow) torch part
    busy = cpu_busy_fraction()
    if busy is not None and busy > 0.25:
        print(f"warning: the CPUs were {busy:.0%} busy just before the run; other work on the machine "
              f"makes these timings unreliable (torch's thread pool degrades badly when a core is busy)",
              file=sys.stderr)

    import torch
    torch_ms, times, cfg, (hshape, eshape) = bench_torch(args.transformer, args.input, args.threads, args.iters)
    _, _, f, h, w = hshape
    flops = dit_flops(cfg, batch=hshape[0], frames=f, height=h, width=w, text_len=eshape[1])
    torch_gflops = flops / (torch_ms * 1e-3) / 1e9
    print(f"torch {torch.__version__}: threads={args.threads} iters={args.iters} "
          f"median={torch_ms:.2f} ms (min {min(times):.2f}, max {max(times):.2f}) "
          f"flops/forward={flops / 1e9:.3f} GFLOP -> {torch_gflops:.1f} GFLOP/s")

    summary = {"threads": args.threads, "iters": args.iters, "gflop_per_forward": flops / 1e9,
               "torch_ms": torch_ms, "torch_gflops": torch_gflops}
    if args.longtake:
        lt_ms, lt_gflops = run_longtake(args.longtake, args.transformer, args.input, args.threads, args.iters)
        ratio = torch_ms / lt_ms
        summary.update(longtake_ms=lt_ms, longtake_gflops=lt_gflops, ratio=ratio)
        print()
        print(f"{'':<10}{'median ms':>12}{'GFLOP/s':>10}")
        print(f"{'torch':<10}{torch_ms:>12.2f}{torch_gflops:>10.1f}")
        print(f"{'longtake':<10}{lt_ms:>12.2f}{lt_gflops:>10.1f}")
        print(f"ratio torch_ms/longtake_ms = {ratio:.3f}  (>1 means longtake is faster)")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
