#!/usr/bin/env python3
"""Generate the Python-reference fixtures used by longtake's parity tests.

Writes (relative to the repository root, or --out):
  model/tests/fixtures/dit/<name>/transformer/{config.json, *.safetensors[, index.json]}
  model/tests/fixtures/dit/<name>/io.safetensors
  model/tests/fixtures/sched/<name>/{scheduler_config.json, trajectory.safetensors}

Everything is seeded and computed in fp32 on the CPU, so rerunning the script reproduces
the same files (up to torch version differences). See tools/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_common import randomize_wan_transformer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "model" / "tests" / "fixtures"

BASE_CFG = dict(
    patch_size=[1, 2, 2],
    in_channels=16,
    out_channels=16,
    freq_dim=256,
    eps=1e-6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
)

# name -> (config overrides, input spec, options)
DIT_CASES = {
    "tiny": dict(
        cfg=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2,
                 text_dim=32, rope_max_seq_len=32),
        batch=2, frames=3, height=6, width=8, text_len=24, real_rows=[7, 12],
        timesteps=[999.0, 437.0], seed=1001,
    ),
    # head_dim 128 as in the real models (RoPE split 44/42/42). One head keeps it small:
    # the checkpoint grows as ~14*D*D (time_proj alone is 6*D*D), so 2 heads (D = 256) would
    # be 2.6 MB even in bf16 and 4 heads ~10 MB. Multi-head layouts are covered by tiny/odd.
    # Stored in bf16 on disk; the reference is computed in fp32 from the bf16-rounded weights.
    "hd128": dict(
        cfg=dict(num_attention_heads=1, attention_head_dim=128, ffn_dim=256, num_layers=1,
                 text_dim=48, rope_max_seq_len=32),
        batch=1, frames=2, height=4, width=6, text_len=512, real_rows=[9],
        timesteps=[750.0], seed=1002, bf16_disk=True,
    ),
    "odd": dict(
        cfg=dict(num_attention_heads=3, attention_head_dim=12, ffn_dim=40, num_layers=2,
                 text_dim=20, rope_max_seq_len=16),
        batch=2, frames=5, height=10, width=14, text_len=16, real_rows=[5, 16],
        timesteps=[999.0, 3.0], seed=1003, shard="40KB",
    ),
    "bf16disk": dict(
        cfg=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2,
                 text_dim=32, rope_max_seq_len=32),
        batch=1, frames=3, height=6, width=8, text_len=24, real_rows=[10],
        timesteps=[500.0], seed=1004, bf16_disk=True,
    ),
}


def one_key_metadata(meta: dict) -> dict[str, str]:
    """safetensors writes multi-key metadata in hash order; one key keeps reruns byte-identical."""
    return {"fixture": json.dumps(meta, sort_keys=True)}


def file_sizes(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def make_dit(out_root: Path, name: str, case: dict) -> None:
    from diffusers import WanTransformer3DModel

    d = out_root / "dit" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cfg = dict(BASE_CFG, **case["cfg"])

    torch.manual_seed(case["seed"])
    model = WanTransformer3DModel(**cfg).eval()  # fp32 by default
    randomize_wan_transformer(model, case["seed"])
    if case.get("bf16_disk"):
        # Round every parameter to bf16, then go back to fp32 for the reference forward.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))

    gen = torch.Generator().manual_seed(case["seed"] + 50_000)
    b, f, h, w, s = case["batch"], case["frames"], case["height"], case["width"], case["text_len"]
    hidden = torch.randn(b, cfg["in_channels"], f, h, w, generator=gen)
    timestep = torch.tensor(case["timesteps"], dtype=torch.float32)
    enc = torch.zeros(b, s, cfg["text_dim"])
    for i, real in enumerate(case["real_rows"]):
        enc[i, :real] = torch.randn(real, cfg["text_dim"], generator=gen)

    # Intermediates via forward hooks.
    captured: dict[str, torch.Tensor] = {}

    def cond_hook(_m, _inp, out):
        temb, timestep_proj = out[0], out[1]
        captured["temb"] = temb.detach().clone()
        captured["timestep_proj"] = timestep_proj.detach().reshape(b, 6, -1).clone()
        captured["context"] = out[2].detach().clone()

    def patch_hook(_m, _inp, out):
        captured["patch_embed"] = out.detach().flatten(2).transpose(1, 2).contiguous()

    def block_hook(idx):
        def hook(_m, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            captured[f"block_{idx}"] = t.detach().clone()
        return hook

    handles = [model.condition_embedder.register_forward_hook(cond_hook),
               model.patch_embedding.register_forward_hook(patch_hook)]
    handles += [blk.register_forward_hook(block_hook(i)) for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        sample = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=enc,
                       return_dict=False)[0]
    for hd in handles:
        hd.remove()
    assert sample.shape == hidden.shape, (sample.shape, hidden.shape)

    # Save the checkpoint.
    save_kwargs = dict(safe_serialization=True)
    if case.get("shard"):
        save_kwargs["max_shard_size"] = case["shard"]
    to_save = model
    if case.get("bf16_disk"):
        import copy
        import logging
        # .to(bf16) also casts the keep-in-fp32 modules; that is intended here (an all-bf16 file).
        logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
        to_save = copy.deepcopy(model).to(torch.bfloat16)
    to_save.save_pretrained(str(d / "transformer"), **save_kwargs)

    tensors = {
        "hidden_states": hidden.contiguous(),
        "timestep": timestep.contiguous(),
        "encoder_hidden_states": enc.contiguous(),
        "sample": sample.contiguous(),
    }
    for k, v in captured.items():
        # The projected text is [B, S, D]; skip it when large (hd128: S = 512).
        if k == "context" and v.numel() > 50_000:
            continue
        tensors[k] = v.to(torch.float32).contiguous()
    meta = {
        "real_rows": case["real_rows"],
        "seed": case["seed"],
        "weights_on_disk": "bf16" if case.get("bf16_disk") else "f32",
        "note": "sample = WanTransformer3DModel forward in fp32 (torch no_grad); "
                "patch_embed/block_i are [B,L,D]; timestep_proj is [B,6,D]",
    }
    save_file(tensors, str(d / "io.safetensors"), metadata=one_key_metadata(meta))

    # Reload check: from_pretrained (upcast to fp32) must reproduce `sample`.
    reloaded = WanTransformer3DModel.from_pretrained(str(d / "transformer"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        again = reloaded(hidden_states=hidden, timestep=timestep, encoder_hidden_states=enc,
                         return_dict=False)[0]
    err = (again - sample).abs().max().item()
    if err > 1e-5:
        raise RuntimeError(f"dit/{name}: reloaded model differs from reference by {err}")

    shards = sorted(p.name for p in (d / "transformer").iterdir())
    print(f"dit/{name}: max|sample|={sample.abs().max().item():.4f} "
          f"mean|sample|={sample.abs().mean().item():.4f} reload_err={err:.2e} "
          f"params={sum(p.numel() for p in model.parameters())} files={shards}")
    print(f"  io tensors: " + ", ".join(f"{k}{list(v.shape)}" for k, v in tensors.items()))


UNIPC_WAN = dict(
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    num_train_timesteps=1000,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)

SCHED_CASES = {
    "unipc_n10_s3": dict(kind="unipc", kwargs=dict(UNIPC_WAN, flow_shift=3.0), steps=10,
                         shape=[2, 16, 3, 4, 4], seed=2001),
    "unipc_n50_s5": dict(kind="unipc", kwargs=dict(UNIPC_WAN, flow_shift=5.0), steps=50,
                         shape=[1, 4, 2, 2, 2], seed=2002),
    "unipc_n2_s3": dict(kind="unipc", kwargs=dict(UNIPC_WAN, flow_shift=3.0), steps=2,
                        shape=[2, 16, 3, 4, 4], seed=2003),
    "euler_n10_s3": dict(kind="euler", kwargs=dict(shift=3.0, num_train_timesteps=1000), steps=10,
                         shape=[2, 16, 3, 4, 4], seed=2004),
    "euler_n7_s1": dict(kind="euler", kwargs=dict(shift=1.0, num_train_timesteps=1000), steps=7,
                        shape=[2, 16, 3, 4, 4], seed=2005),
}


def make_sched(out_root: Path, name: str, case: dict) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    d = out_root / "sched" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cls = UniPCMultistepScheduler if case["kind"] == "unipc" else FlowMatchEulerDiscreteScheduler
    sched = cls(**case["kwargs"])
    sched.save_config(str(d))
    sched.set_timesteps(case["steps"])
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)

    n = case["steps"]
    gen = torch.Generator().manual_seed(case["seed"])
    x_init = torch.randn(*case["shape"], generator=gen)
    model_outputs = torch.randn(n, *case["shape"], generator=gen)
    timesteps = sched.timesteps
    assert len(timesteps) == n, (len(timesteps), n)
    x = x_init.clone()
    samples = []
    for i, t in enumerate(timesteps):
        x = sched.step(model_outputs[i], t, x, return_dict=True).prev_sample
        samples.append(x.clone())
    samples = torch.stack(samples)

    tensors = {
        "sigmas": sched.sigmas.to(torch.float32).contiguous(),
        "timesteps": timesteps.to(torch.float32).contiguous(),
        "x_init": x_init.contiguous(),
        "model_outputs": model_outputs.contiguous(),
        "samples": samples.to(torch.float32).contiguous(),
    }
    meta = {"class": cls.__name__, "num_inference_steps": n,
            "timesteps_dtype": str(timesteps.dtype).replace("torch.", "")}
    save_file(tensors, str(d / "trajectory.safetensors"), metadata=one_key_metadata(meta))
    ts = timesteps.tolist()
    print(f"sched/{name}: {cls.__name__} N={n} sigmas[:3]={[round(v, 8) for v in sched.sigmas[:3].tolist()]} "
          f"timesteps({meta['timesteps_dtype']})[:3]={ts[:3]} last_t={ts[-1]} "
          f"max|final|={samples[-1].abs().max().item():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures root (default: %(default)s)")
    ap.add_argument("--only", nargs="*", help="subset of case names to (re)generate")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)
    import diffusers
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}; writing under {args.out}")

    for name, case in DIT_CASES.items():
        if not args.only or name in args.only:
            make_dit(args.out, name, case)
    for name, case in SCHED_CASES.items():
        if not args.only or name in args.only:
            make_sched(args.out, name, case)

    print("\nfiles written:")
    total = 0
    for rel, size in file_sizes(args.out):
        total += size
        print(f"  {size:>9}  {rel}")
    print(f"  {total:>9}  total bytes")


if __name__ == "__main__":
    main()
