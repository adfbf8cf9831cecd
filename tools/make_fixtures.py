#!/usr/bin/env python3
"""Generate the Python-reference fixtures used by longtake's parity tests.

Writes (relative to the repository root, or --out):
  model/tests/fixtures/dit/<name>/transformer/{config.json, *.safetensors[, index.json]}
  model/tests/fixtures/dit/<name>/io.safetensors
  model/tests/fixtures/sched/<name>/{scheduler_config.json, trajectory.safetensors}
  model/tests/fixtures/vae/<name>/{vae/, io.safetensors}
  model/tests/fixtures/text/<name>/{tokenizer/, text_encoder/, cases.json, io.safetensors}
  model/tests/fixtures/pipeline/<name>/{model_index.json, scheduler/, text_encoder/, tokenizer/,
                                        transformer/, vae/, runs.json, run_<k>.safetensors}

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
from wan_common import (  # noqa: E402
    randomize_umt5,
    randomize_wan_transformer,
    randomize_wan_vae,
    umt5_config,
    wan_t5_prompt_embeds,
)

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
    # Many heads, as real checkpoints shard them (Wan2.1-1.3B: 12 heads, 14B: 40): 24 heads of 8
    # so that every tensor-parallel size up to 12 keeps several heads per rank (tp 12: 2 each)
    # and the divisors 1..24 all run; small D (192) and bf16 keep it about 1 MB on disk.
    "heads24": dict(
        cfg=dict(num_attention_heads=24, attention_head_dim=8, ffn_dim=48, num_layers=1,
                 text_dim=16, rope_max_seq_len=16),
        batch=1, frames=2, height=4, width=6, text_len=16, real_rows=[11],
        timesteps=[620.0], seed=1005, bf16_disk=True,
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


def compact_json(obj) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    import re

    text = json.dumps(obj, indent=1, ensure_ascii=False)
    out = re.sub(r"\[\s*([-0-9.eE,\s]+?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                 text) + "\n"
    assert json.loads(out) == obj
    return out


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


# ------------------------------------------------------------------------------------------
# VAE

VAE_SMALL_CFG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)

VAE_CASES = {
    "small": dict(cfg=VAE_SMALL_CFG, seed=3001, latents=[1, 16, 3, 4, 6], video=[1, 3, 9, 32, 48]),
    "b2": dict(cfg=dict(VAE_SMALL_CFG, base_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=2), seed=3002,
               latents=[2, 16, 2, 3, 5], video=[1, 3, 5, 24, 40]),
    # 9 latent frames, with a copy of the small VAE.
    "long": dict(weights_from="small", seed=3003, latents=[1, 16, 9, 2, 2]),
}


def make_vae(out_root: Path, name: str, case: dict) -> None:
    from diffusers import AutoencoderKLWan

    d = out_root / "vae" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if case.get("weights_from"):
        vae_dir = out_root / "vae" / case["weights_from"] / "vae"
        if not vae_dir.is_dir():
            raise SystemExit(f"vae/{name} needs vae/{case['weights_from']} (generate it first)")
        # A byte-identical copy (git stores it once), so that every vae/<name>/ has the same layout.
        shutil.copytree(vae_dir, d / "vae")
        vae = AutoencoderKLWan.from_pretrained(str(d / "vae"), torch_dtype=torch.float32).eval()
    else:
        torch.manual_seed(case["seed"])
        vae = AutoencoderKLWan(**case["cfg"]).eval()
        randomize_wan_vae(vae, case["seed"])
        vae.save_pretrained(str(d / "vae"), safe_serialization=True)

    gen = torch.Generator().manual_seed(case["seed"] + 50_000)
    tensors = {"latents": torch.randn(*case["latents"], generator=gen)}
    if case.get("video"):
        tensors["video"] = torch.rand(*case["video"], generator=gen) * 2 - 1
    with torch.no_grad():
        tensors["sample"] = vae.decode(tensors["latents"]).sample
        if "video" in tensors:
            dist = vae.encode(tensors["video"]).latent_dist
            tensors["posterior_mean"] = dist.mean
            tensors["posterior_logvar"] = dist.logvar
    b, _, t, h, w = case["latents"]
    assert tuple(tensors["sample"].shape) == (b, 3, 1 + 4 * (t - 1), 8 * h, 8 * w), tensors["sample"].shape

    # Reload check on the saved weights.
    if not case.get("weights_from"):
        again = AutoencoderKLWan.from_pretrained(str(d / "vae"), torch_dtype=torch.float32).eval()
        with torch.no_grad():
            err = (again.decode(tensors["latents"]).sample - tensors["sample"]).abs().max().item()
        if err > 1e-6:
            raise RuntimeError(f"vae/{name}: reloaded VAE differs by {err}")

    tensors = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}
    meta = {"seed": case["seed"], "weights_from": case.get("weights_from", name),
            "note": "sample = AutoencoderKLWan.decode(latents).sample (frame-by-frame cached decode, clamped "
                    "to [-1,1]); posterior_mean/logvar = encode(video).latent_dist.mean/.logvar (logvar "
                    "clamped to [-30,20])"}
    save_file(tensors, str(d / "io.safetensors"), metadata=one_key_metadata(meta))
    smp = tensors["sample"]
    print(f"vae/{name}: weights_from={meta['weights_from']} clamped={(smp.abs() >= 1).float().mean().item():.3%} "
          f"std(sample)={smp.std().item():.3f} params={sum(p.numel() for p in vae.parameters())}")
    print(f"  io tensors: " + ", ".join(f"{k}{list(v.shape)}" for k, v in tensors.items()))


# ------------------------------------------------------------------------------------------
# Text encoder + tokenizer

TEXT_CASES = {
    "tiny": dict(seed=4001, tokenizer_seed=4242, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2),
}


def write_special_tokens_map(tok_dir: Path, tokenizer) -> None:
    """transformers 5 no longer writes special_tokens_map.json; hub T5 tokenizer dirs have one."""
    m = {"additional_special_tokens": [str(t) for t in getattr(tokenizer, "extra_special_tokens", [])],
         "eos_token": str(tokenizer.eos_token), "pad_token": str(tokenizer.pad_token),
         "unk_token": str(tokenizer.unk_token)}
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(m, indent=2, ensure_ascii=False) + "\n")


def check_tokenizer_parity(tok_dir: Path, strings: list[str]) -> int:
    """AutoTokenizer (what WanPipeline uses) and a plain tokenizers.Tokenizer.from_file must agree."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    if json.loads(auto.backend_tokenizer.to_str()) != json.loads(raw.to_str()):
        raise RuntimeError("the tokenizer transformers builds differs from tokenizer.json")
    for s_ in strings:
        a = auto(s_, add_special_tokens=True).input_ids
        r = raw.encode(s_).ids
        if a != r:
            raise RuntimeError(f"tokenizer mismatch on {s_!r}: {a} vs {r}")
    return len(strings)


def parity_strings(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    alphabet = (list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,!?&<>'\"-") + list("éèüöñçßàÉ") +
                list("狐狸雪猫犬東京の夜한국ΩλЖ") + ["\u3000", "\u00a0", "\u200b", "\uff21", "\ufb01", "\u2026",
                                                   "\u00bd", "e\u0301", "  ", "\t", "\n", "🦊", "<extra_id_1>"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(400)]


def make_text(out_root: Path, name: str, case: dict) -> None:
    import diffusers.utils
    from transformers import AutoTokenizer, UMT5EncoderModel

    import wan_text

    d = out_root / "text" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    tok_dir = d / "tokenizer"
    tok = wan_text.build_tokenizer(str(tok_dir), seed=case["tokenizer_seed"])
    write_special_tokens_map(tok_dir, tok)
    n_checked = check_tokenizer_parity(tok_dir, parity_strings(case["seed"]) + wan_text.text_prompts())
    tok = AutoTokenizer.from_pretrained(str(tok_dir))  # as the pipeline loads it
    vocab_size = len(tok)

    torch.manual_seed(case["seed"])
    cfg = umt5_config(vocab_size, d_model=case["d_model"], d_kv=case["d_kv"], num_heads=case["num_heads"],
                      d_ff=case["d_ff"], num_layers=case["num_layers"])
    te = UMT5EncoderModel(cfg).eval()
    randomize_umt5(te, case["seed"])
    te.save_pretrained(str(d / "text_encoder"), safe_serialization=True)
    te = UMT5EncoderModel.from_pretrained(str(d / "text_encoder"), torch_dtype=torch.float32).eval()

    cases, tensors = [], {}
    max_direct_err = 0.0
    for i, prompt in enumerate(wan_text.text_prompts()):
        cleaned, ids, embeds = wan_t5_prompt_embeds(tok, te, prompt, 512)
        n = len(ids)
        assert embeds.shape == (1, 512, cfg.d_model), embeds.shape
        assert torch.all(embeds[:, n:] == 0)
        with torch.no_grad():
            full = torch.tensor([ids + [0] * (512 - n)])
            mask = torch.tensor([[1] * n + [0] * (512 - n)])
            hidden = te(full, mask).last_hidden_state[:, :n]
            direct = te(torch.tensor([ids])).last_hidden_state  # only the real tokens, no mask
        if not torch.equal(hidden, embeds[:, :n]):
            raise RuntimeError(f"text/{name} case {i}: hidden != prompt_embeds[:, :n]")
        max_direct_err = max(max_direct_err, (direct - hidden).abs().max().item())
        cases.append({"prompt": prompt, "cleaned": cleaned, "input_ids": ids, "seq_len": n})
        tensors[f"prompt_embeds_{i}"] = embeds.to(torch.float32).contiguous()
        tensors[f"hidden_{i}"] = hidden.to(torch.float32).contiguous()
        print(f"text/{name} case {i}: seq_len={n} cleaned={cleaned[:60]!r}{'...' if len(cleaned) > 60 else ''}")
    # One case per line.
    (d / "cases.json").write_text("[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]\n")
    meta = {"seed": case["seed"], "max_sequence_length": 512,
            "ftfy_installed": bool(diffusers.utils.is_ftfy_available()),
            "note": "prompt_embeds_i = WanPipeline._get_t5_prompt_embeds(cases[i].prompt) [1,512,D]; "
                    "hidden_i = UMT5 last_hidden_state at the real positions [1,seq_len,D]"}
    save_file(tensors, str(d / "io.safetensors"), metadata=one_key_metadata(meta))
    from safetensors import safe_open
    with safe_open(str(d / "text_encoder" / "model.safetensors"), "pt") as fh:
        names = sorted(fh.keys())
    print(f"text/{name}: vocab={vocab_size} specials pad={tok.pad_token_id} eos={tok.eos_token_id} "
          f"unk={tok.unk_token_id}; tokenizer parity checked on {n_checked} strings; "
          f"real-tokens-only encode max diff {max_direct_err:.2e}; ftfy={meta['ftfy_installed']}; "
          f"{len(names)} checkpoint tensors, embedding: {[k for k in names if 'embed' in k or 'shared' in k]}")


# ------------------------------------------------------------------------------------------
# Whole pipeline

PIPE_TRANSFORMER_CFG = dict(BASE_CFG, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2,
                            text_dim=32, freq_dim=64, rope_max_seq_len=32)

PIPE_CASES = {
    "tiny": dict(seed=5001, text="tiny", vae="small", flow_shift=3.0, runs=[
        dict(prompt="a red fox running through snow", negative_prompt="blurry", num_frames=9, height=32,
             width=48, num_inference_steps=4, guidance_scale=5.0, noise_seed=5101),
        dict(prompt="a red fox running through snow", negative_prompt=None, num_frames=5, height=16, width=32,
             num_inference_steps=3, guidance_scale=1.0, noise_seed=5102),
    ]),
}


def make_pipeline(out_root: Path, name: str, case: dict) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    d = out_root / "pipeline" / name
    if d.exists():
        shutil.rmtree(d)
    text_dir = out_root / "text" / case["text"]
    vae_dir = out_root / "vae" / case["vae"] / "vae"
    for need in (text_dir / "tokenizer", text_dir / "text_encoder", vae_dir):
        if not need.is_dir():
            raise SystemExit(f"pipeline/{name} needs {need} (generate text/{case['text']} and vae/{case['vae']})")

    torch.manual_seed(case["seed"])
    transformer = WanTransformer3DModel(**PIPE_TRANSFORMER_CFG).eval()
    randomize_wan_transformer(transformer, case["seed"])
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(str(text_dir / "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(str(text_dir / "text_encoder"),
                                                      torch_dtype=torch.float32).eval(),
        vae=AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=torch.float32).eval(),
        scheduler=UniPCMultistepScheduler(**UNIPC_WAN, flow_shift=case["flow_shift"]),
        transformer=transformer,
    )
    pipe.save_pretrained(str(d), safe_serialization=True)
    # Components that were loaded from disk save loader state into their configs (tokenizer:
    # "is_local", "local_files_only"; VAE: "_name_or_path" = the absolute source path), so the
    # shared components' config files are copied from the text/ and vae/ fixtures as they are.
    # Everything else must already be byte-identical.
    for sub, ref in (("tokenizer", text_dir / "tokenizer"), ("text_encoder", text_dir / "text_encoder"),
                     ("vae", vae_dir)):
        saved = sorted(p.name for p in (d / sub).iterdir())
        for f in sorted(ref.iterdir()):
            if f.name.endswith("config.json") or f.name == "special_tokens_map.json":
                shutil.copyfile(f, d / sub / f.name)
            elif f.read_bytes() != (d / sub / f.name).read_bytes():
                raise RuntimeError(f"pipeline/{name}/{sub}/{f.name} differs from {f}")
        if set(saved) - {p.name for p in ref.iterdir()}:
            raise RuntimeError(f"pipeline/{name}/{sub} has unexpected files {saved}")

    pipe = WanPipeline.from_pretrained(str(d), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)

    runs = []
    for k, run in enumerate(case["runs"]):
        nlat = (run["num_frames"] - 1) // 4 + 1
        shape = [1, 16, nlat, run["height"] // 8, run["width"] // 8]
        noise = torch.randn(*shape, generator=torch.Generator().manual_seed(run["noise_seed"]))
        args = dict(prompt=run["prompt"], negative_prompt=run["negative_prompt"], num_frames=run["num_frames"],
                    height=run["height"], width=run["width"], num_inference_steps=run["num_inference_steps"],
                    guidance_scale=run["guidance_scale"], max_sequence_length=512)
        steps = []

        def on_step(_pipe, i, t, kw):
            steps.append(kw["latents"].detach().clone())
            return {}

        latents = pipe(**args, latents=noise.clone(), output_type="latent", callback_on_step_end=on_step,
                       callback_on_step_end_tensor_inputs=["latents"]).frames
        timesteps = pipe.scheduler.timesteps.clone()
        with torch.no_grad():
            video = vae.decode(latents / inv_std + mean).sample
        frames_np = pipe(**args, latents=noise.clone(), output_type="np").frames
        expect_np = (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()
        np_err = float(abs(frames_np - expect_np).max())
        if np_err > 1e-6:
            raise RuntimeError(f"pipeline/{name} run {k}: output_type=np differs from decode by {np_err}")

        # Prompt embeddings as the pipeline built them (only the real rows; the rest are zeros).
        with torch.no_grad():
            pe, ne = pipe.encode_prompt(run["prompt"], run["negative_prompt"],
                                        do_classifier_free_guidance=run["guidance_scale"] > 1.0,
                                        max_sequence_length=512, device=torch.device("cpu"))
        tensors = {"noise": noise, "latents": latents, "video": video, "timesteps": timesteps.to(torch.float32),
                   "step_latents": torch.stack(steps)}
        seq = {}
        for key, emb in (("prompt_embeds", pe), ("negative_prompt_embeds", ne)):
            if emb is None:
                continue
            nz = int((emb[0].abs().sum(-1) != 0).sum())
            assert torch.all(emb[0, nz:] == 0)
            tensors[f"{key}_real"] = emb[:, :nz]
            seq[key] = nz
        tensors = {kk: v.to(torch.float32).contiguous() for kk, v in tensors.items()}
        save_file(tensors, str(d / f"run_{k}.safetensors"),
                  metadata=one_key_metadata({"run": k, "seed": run["noise_seed"]}))
        runs.append({"args": dict(args, output_type="latent", latents="noise (run_%d.safetensors)" % k),
                     "noise_seed": run["noise_seed"], "cfg": run["guidance_scale"] > 1.0,
                     "effective_negative_prompt": (run["negative_prompt"] or "") if run["guidance_scale"] > 1.0
                     else None,
                     "latent_shape": shape, "video_shape": list(video.shape),
                     "timesteps": [int(t) for t in timesteps.tolist()], "seq_len": seq,
                     "np_check_max_abs": np_err,
                     "tensors": {kk: list(v.shape) for kk, v in tensors.items()}})
        print(f"pipeline/{name} run {k}: timesteps={runs[-1]['timesteps']} seq={seq} "
              f"|latents|max={latents.abs().max().item():.3f} video clamped="
              f"{(video.abs() >= 1).float().mean().item():.2%} np_err={np_err:.1e}")
    (d / "runs.json").write_text(compact_json(runs))
    print(f"pipeline/{name}: model_index={json.loads((d / 'model_index.json').read_text())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures root (default: %(default)s)")
    ap.add_argument("--only", nargs="*",
                    help="subset of cases to (re)generate: NAME (every kind with that name) or KIND/NAME, "
                         "e.g. tiny, dit/tiny, vae, pipeline/tiny")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)
    import diffusers
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}; writing under {args.out}")

    def wanted(kind: str, name: str) -> bool:
        return not args.only or any(o in (name, kind, f"{kind}/{name}") for o in args.only)

    # Order matters: vae/long reuses vae/small, and pipeline/ reuses text/ and vae/.
    for kind, cases, make in (("dit", DIT_CASES, make_dit), ("sched", SCHED_CASES, make_sched),
                              ("vae", VAE_CASES, make_vae), ("text", TEXT_CASES, make_text),
                              ("pipeline", PIPE_CASES, make_pipeline)):
        for name, case in cases.items():
            if wanted(kind, name):
                make(args.out, name, case)

    print("\nfiles written:")
    total = 0
    for rel, size in file_sizes(args.out):
        total += size
        print(f"  {size:>9}  {rel}")
    print(f"  {total:>9}  total bytes")


if __name__ == "__main__":
    main()
