#!/usr/bin/env python3
"""Train the demo model: a small Wan2.1 (diffusers layout) that draws the scenes of tools/scenes.py.

One command, seeded, on the CPU:

    nice -n 19 .venv/bin/python tools/train_demo.py            # all phases, ~85 min + evaluation on 2 cores

Phases (each resumes from the work directory, default target/demo-train/, so a phase can be rerun alone
with --phase):
  1. text     the tokenizer (a Unigram model whose pieces are the grammar's words, plus single characters
              so that other text does not become <unk>; written through transformers' T5Tokenizer, the
              same file layout as umt5-xxl's) and a freshly initialised UMT5EncoderModel.
  2. vae      AutoencoderKLWan (base_dim 8, z_dim 16, dim_mult [1,2,4,4], 1 res block) trained to
              reconstruct random 9-frame training clips (batch 3; L1 + MSE on [-1, 1] pixels without the
              decoder's final clamp, a small KL term, and an anchor pulling latent channels 0-2 towards
              the clip's colours averaged per latent cell).
     vae2     the same VAE continued on 81-frame clips (batch 1). Trained on short clips only, it breaks
              down on latent frames past the training length (the causal convolutions' caches then hold
              features it never saw); the decoder's temporal receptive field spans about 18 latent frames.
  3. latents  every training scene is rendered as one long clip (161 frames at a random position) and
              encoded (posterior mean) to 41 latent frames; the per-channel mean / std over all of them
              become the VAE config's latents_mean / latents_std, and the cached latents are normalised
              as WanPipeline expects: (z - mean) / std.
  4. dit      WanTransformer3DModel and the text encoder trained together with Wan's flow matching on
              21-frame latent windows (a window starting at latent frame 0 with probability 0.3, else at
              a random offset, so that both the first window of a video and later windows are seen):
              sigma = shift*u / (1 + (shift-1)*u), u ~ U(0, 1), shift = flow_shift (3.0), timestep =
              1000*sigma, x_t = (1 - sigma) x0 + sigma * noise, target = noise - x0, MSE. 10% of the
              captions are replaced by the empty prompt (classifier-free guidance). The text goes through
              WanPipeline's path: tokens + </s>, encoder, real rows kept, zero rows up to 512.
              An exponential moving average of the transformer's weights is what gets exported.
  5. export   WanPipeline(...).save_pretrained(--out) with UniPCMultistepScheduler (Wan's settings,
              flow_shift 3.0), all weights f32. Also written every --export-every DiT steps, so a usable
              model exists while training runs.
  6. eval     WanPipeline.from_pretrained(--out) generates 81 frames (64x64) for every held-out caption and
              some training captions; tools/scenes.py's checker scores them; eval.json + PNG strips go
              to the work directory.
  7. long     a 961-frame (60 s) video of two captions with tools/reference_codenoise.py's window
              co-denoising (21-frame windows, overlap 4), as longtake renders it, scored whole and per
              81 frames.

Each training phase stops at its step count or its wall-clock budget (--vae-minutes, --dit-minutes),
whichever comes first; the learning-rate schedule follows the larger of the two fractions, so a run that
hits the time budget still ends with a decayed learning rate. Runs that stop on the step count are
reproducible; runs that stop on time depend on the machine's speed.

torch runs with --threads (default 1): on a 2-core machine shared with other work, a 2-thread pool
spin-waits whenever the other core is busy and runs several times slower than one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZE = 64
FLOW_SHIFT = 3.0
WINDOW = 21  # latent frames per DiT training window (81 pixel frames)
TEXT_LEN = 512
VAE_CFG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)
DIT_CFG = dict(patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=48, in_channels=16,
               out_channels=16, text_dim=64, freq_dim=256, ffn_dim=512, num_layers=4, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TEXT_CFG = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)
UNIPC_WAN = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                 solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                 final_sigmas_type="zero", flow_shift=FLOW_SHIFT)
EXTRA_IDS = 4
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# Text: tokenizer and encoder

def build_tokenizer(out_dir: Path):
    """Unigram tokenizer: the grammar's words as whole pieces ("▁red"), plus single characters."""
    import wan_text
    from transformers import T5TokenizerFast

    words = sorted(set(scenes.WORDS))
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0) for w in words]
    vocab += [("▁", -5.0)] + [(c, -8.0) for c in chars]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
    tok = T5TokenizerFast(vocab=vocab, _spm_precompiled_charsmap=wan_text.small_charsmap(), extra_ids=EXTRA_IDS,
                          model_max_length=TEXT_LEN)
    tok.save_pretrained(str(out_dir))
    m = {"additional_special_tokens": [str(t) for t in getattr(tok, "extra_special_tokens", [])],
         "eos_token": str(tok.eos_token), "pad_token": str(tok.pad_token), "unk_token": str(tok.unk_token)}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(m, indent=2, ensure_ascii=False) + "\n")
    return tok


def load_tokenizer(d: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def text_config(vocab_size: int):
    from transformers import UMT5Config

    return UMT5Config(vocab_size=vocab_size, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0,
                      eos_token_id=1, tie_word_embeddings=False, **TEXT_CFG)


def encode_text(tok, te, prompts: list[str]) -> torch.Tensor:
    """WanPipeline's prompt_embeds [B, 512, D] (real rows, then exact zeros), differentiable through te.
    The encoder runs on the real tokens only (with the mask over the batch's longest prompt), which gives
    the same real rows as the pipeline's run over all 512 positions."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    enc = tok([prompt_clean(p) for p in prompts], padding="longest", truncation=True, max_length=TEXT_LEN,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    hidden = te(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    hidden = hidden * enc.attention_mask[..., None].to(hidden.dtype)
    out = hidden.new_zeros(len(prompts), TEXT_LEN, hidden.shape[-1])
    out[:, :hidden.shape[1]] = hidden
    return out


# ------------------------------------------------------------------------------------------
# Schedules

def lr_at(progress: float, base: float, warmup_frac: float, floor: float = 0.05) -> float:
    if progress < warmup_frac:
        return base * max(progress / warmup_frac, 0.01)
    p = (progress - warmup_frac) / max(1e-9, 1 - warmup_frac)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def to_pixels(clip: np.ndarray) -> torch.Tensor:
    """uint8 [F,H,W,3] -> float [3,F,H,W] in [-1, 1]."""
    return torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------
# Phases

def phase_text(args, work: Path) -> None:
    from transformers import UMT5EncoderModel

    tok_dir = work / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tok_dir.mkdir(parents=True)
    build_tokenizer(tok_dir)
    tok = load_tokenizer(tok_dir)
    for s in scenes.all_scenes()[:3]:
        ids = tok(s.caption).input_ids
        assert tok.unk_token_id not in ids and len(ids) == 10, (s.caption, ids)
    torch.manual_seed(args.seed + 1)
    te = UMT5EncoderModel(text_config(len(tok)))
    te.save_pretrained(str(work / "text_encoder_init"), safe_serialization=True)
    log(f"text: vocab {len(tok)}, example ids {tok(scenes.all_scenes()[0].caption).input_ids}, "
        f"encoder {sum(p.numel() for p in te.parameters()) / 1e6:.3f} M params")


def decode_raw(vae, z: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan.decode (the same frame-by-frame cached pass) without the final clamp to [-1, 1],
    whose zero gradient would trap outputs that overshoot on the wrong side."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(outs, 2)


def phase_vae(args, work: Path, stage: int = 1) -> None:
    """Stage 1: short clips (--vae-frames) from a fresh VAE. Stage 2 (phase vae2): continue on clips of
    --vae2-frames; a VAE trained on short clips only breaks down on latent frames past the training
    length (the causal convolutions' caches then hold features it never saw), and the decoder's temporal
    receptive field spans about 18 latent frames."""
    from diffusers import AutoencoderKLWan

    if stage == 2:
        torch.manual_seed(args.seed + 12)
        rng = random.Random(args.seed + 12)
        vae = AutoencoderKLWan.from_pretrained(str(work / "vae"), torch_dtype=torch.float32)
        vae.train()
        n_steps, minutes, batch, frames, base_lr = (args.vae2_steps, args.vae2_minutes, args.vae2_batch,
                                                    args.vae2_frames, args.vae2_lr)
    else:
        torch.manual_seed(args.seed + 2)
        rng = random.Random(args.seed + 2)
        vae = AutoencoderKLWan(**VAE_CFG)
        n_steps, minutes, batch, frames, base_lr = (args.vae_steps, args.vae_minutes, args.vae_batch,
                                                    args.vae_frames, args.vae_lr)
    if stage == 1:
        with torch.no_grad():
            # Zero biases: with PyTorch's default bias init the encoder's output barely depends on its input
            # (the biases' common component dominates after a few normalised layers), and training sits on a
            # plateau where the decoder ignores the latent.
            for name, p in vae.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
            # A small initial posterior std (e^-3), so that the latent is not mostly noise.
            vae.quant_conv.bias[VAE_CFG["z_dim"]:] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=base_lr, betas=(0.9, 0.99), weight_decay=0.0)
    train = scenes.train_scenes()
    t0 = time.time()
    budget = minutes * 60
    hist, acc = [], []
    step = 0
    while step < n_steps:
        progress = max(step / n_steps, (time.time() - t0) / budget)
        if progress >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, base_lr, 0.03)
        x = torch.stack([to_pixels(scenes.render(rng.choice(train), frames, SIZE, SIZE,
                                                 seed=rng.getrandbits(32)))
                         for _ in range(batch)])
        post = vae.encode(x).latent_dist
        y = decode_raw(vae, post.sample())
        rec_l1 = (y - x).abs().mean()
        rec_mse = (y - x).pow(2).mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        # Anchor: latent channels 0-2 are pulled towards the clip's colours averaged over each latent cell
        # (8x8 pixels, and the frames a latent frame covers), which gives the decoder an informative latent
        # from the first steps.
        b, _, t, h, w = x.shape
        anchor = torch.cat([x[:, :, :1], x[:, :, 1:].reshape(b, 3, (t - 1) // 4, 4, h, w).mean(3)], 2)
        anchor = torch.nn.functional.avg_pool3d(anchor, (1, 8, 8))
        aux = (post.mean[:, :3] - anchor).pow(2).mean()
        loss = rec_l1 + rec_mse + args.vae_kl * kl + args.vae_anchor * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        acc.append((rec_l1.item(), rec_mse.item(), kl.item(), aux.item()))
        if step % 25 == 0 or step == n_steps:
            a = np.mean(acc, axis=0)
            acc = []
            hist.append(dict(step=step, minutes=round((time.time() - t0) / 60, 2), l1=float(a[0]), mse=float(a[1]),
                             kl=float(a[2]), anchor=float(a[3])))
            log(f"vae{stage} step {step} ({hist[-1]['minutes']} min): L1 {a[0]:.4f} MSE {a[1]:.5f} KL {a[2]:.3f} "
                f"anchor {a[3]:.4f}")
        if step % 100 == 0:
            vae.save_pretrained(str(work / "vae"), safe_serialization=True)
    vae.save_pretrained(str(work / "vae"), safe_serialization=True)
    (work / f"vae{stage}_losses.json").write_text(json.dumps(dict(steps=step, minutes=(time.time() - t0) / 60,
                                                                  frames=frames, batch=batch, history=hist), indent=1))
    log(f"vae{stage} done: {step} steps in {(time.time() - t0) / 60:.1f} min")


def phase_vae3(args, work: Path) -> None:
    """(Optional, not in the default phases.) Decoder-only fine-tuning on long clips after the latents are cached: the encoder (and so the
    latent space the transformer learns) stays fixed; the decoder sees the posterior mean plus a little
    noise (--vae3-noise x the latents' per-channel std), for robustness to imperfect generated latents."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed + 22)
    rng = random.Random(args.seed + 22)
    vae = AutoencoderKLWan.from_pretrained(str(work / "vae"), torch_dtype=torch.float32)
    std = torch.load(work / "latents.pt")["std"].view(1, -1, 1, 1, 1)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.vae3_lr, betas=(0.9, 0.99), weight_decay=0.0)
    train = scenes.train_scenes()
    t0 = time.time()
    budget = args.vae3_minutes * 60
    hist, acc, step = [], [], 0
    while step < args.vae3_steps:
        progress = max(step / args.vae3_steps, (time.time() - t0) / budget)
        if progress >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, args.vae3_lr, 0.03)
        x = torch.stack([to_pixels(scenes.render(rng.choice(train), args.vae3_frames, SIZE, SIZE,
                                                 seed=rng.getrandbits(32)))
                         for _ in range(args.vae3_batch)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
            z = z + args.vae3_noise * std * torch.randn_like(z)
        y = decode_raw(vae, z)
        l1, mse = (y - x).abs().mean(), (y - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        (l1 + mse).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc.append((l1.item(), mse.item()))
        if step % 10 == 0:
            a = np.mean(acc, axis=0)
            acc = []
            hist.append(dict(step=step, minutes=round((time.time() - t0) / 60, 2), l1=float(a[0]), mse=float(a[1])))
            log(f"vae3 step {step} ({hist[-1]['minutes']} min): L1 {a[0]:.4f} MSE {a[1]:.5f}")
        if step % 25 == 0:
            vae.save_pretrained(str(work / "vae"), safe_serialization=True)
    vae.save_pretrained(str(work / "vae"), safe_serialization=True)
    (work / "vae3_losses.json").write_text(json.dumps(dict(steps=step, minutes=(time.time() - t0) / 60,
                                                           frames=args.vae3_frames, history=hist), indent=1))
    log(f"vae3 done: {step} steps in {(time.time() - t0) / 60:.1f} min")


@torch.no_grad()
def phase_latents(args, work: Path) -> None:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(work / "vae"), torch_dtype=torch.float32).eval()
    rng = random.Random(args.seed + 3)
    train = scenes.train_scenes()
    t0 = time.time()
    lat, caps = [], []
    items = [(s, rng.getrandbits(32)) for s in train for _ in range(args.clips_per_scene)]
    if args.latent_scenes:
        items = items[:args.latent_scenes]
    for i in range(0, len(items), 4):
        chunk = items[i:i + 4]
        x = torch.stack([to_pixels(scenes.render(s, args.latent_frames, SIZE, SIZE, seed=sd)) for s, sd in chunk])
        z = vae.encode(x).latent_dist.mean
        lat.append(z)
        caps += [s.caption for s, _ in chunk]
        if (i // 4) % 10 == 0:
            log(f"latents {i + len(chunk)}/{len(items)} ({(time.time() - t0) / 60:.1f} min)")
    z = torch.cat(lat)  # [N, 16, T, 8, 8]
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    zn = (z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    torch.save(dict(latents=zn.contiguous(), captions=caps, mean=mean, std=std), work / "latents.pt")
    # Reconstruction of held-out scenes through the pipeline's own (clamped) decode.
    recon = []
    for k, sc in enumerate(scenes.held_out_scenes()[:args.recon_checks]):
        clip = scenes.render(sc, args.latent_frames, SIZE, SIZE, seed=1000 + k)
        x = to_pixels(clip)[None]
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        frames = (y[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1).numpy()
        r = scenes.score(sc, frames)
        recon.append(dict(caption=sc.caption, l1=float((y - x).abs().mean()), mse=float((y - x).pow(2).mean()),
                          bg_frac=r["bg_frac"], obj_frac=r["obj_frac"], motion_ok=r["motion_ok"],
                          shape_ok=r["shape_ok"]))
        log(f"recon {sc.caption}: {recon[-1]}")
    (work / "vae_recon.json").write_text(json.dumps(recon, indent=1))
    log(f"latents: {tuple(z.shape)} in {(time.time() - t0) / 60:.1f} min; mean {mean.numpy().round(3).tolist()} "
        f"std {std.numpy().round(3).tolist()}")


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def phase_dit(args, work: Path) -> None:
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    data = torch.load(work / "latents.pt")
    lat, caps = data["latents"], data["captions"]
    n, _, tlen, _, _ = lat.shape
    tok = load_tokenizer(work / "tokenizer")
    ckpt_path = work / "dit_ckpt.pt"
    torch.manual_seed(args.seed + 4)
    dit = WanTransformer3DModel(**DIT_CFG)
    te = UMT5EncoderModel.from_pretrained(str(work / "text_encoder_init"), torch_dtype=torch.float32)
    ema = WanTransformer3DModel(**DIT_CFG)
    ema.load_state_dict(dit.state_dict())
    ema_te = UMT5EncoderModel.from_pretrained(str(work / "text_encoder_init"), torch_dtype=torch.float32)
    for m in (ema, ema_te):
        m.requires_grad_(False)
    params = list(dit.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.dit_lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 5)
    rng = random.Random(args.seed + 5)
    step, hist, spent = 0, [], 0.0
    if ckpt_path.exists() and args.resume:
        ck = torch.load(ckpt_path)
        dit.load_state_dict(ck["dit"])
        te.load_state_dict(ck["te"])
        ema.load_state_dict(ck["ema"])
        ema_te.load_state_dict(ck["ema_te"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        rng.setstate(ck["rng"])
        step, hist, spent = ck["step"], ck["hist"], ck["spent"]
        log(f"dit: resumed at step {step}")
    log(f"dit: {sum(p.numel() for p in dit.parameters()) / 1e6:.3f} M params, {n} latent clips of {tlen} frames")
    t0 = time.time() - spent
    budget = args.dit_minutes * 60
    acc = []
    ema_pairs = list(zip(list(ema.parameters()) + list(ema_te.parameters()), params))

    def save_ckpt():
        torch.save(dict(dit=dit.state_dict(), te=te.state_dict(), ema=ema.state_dict(), ema_te=ema_te.state_dict(),
                        opt=opt.state_dict(), gen=gen.get_state(), rng=rng.getstate(), step=step, hist=hist,
                        spent=time.time() - t0), ckpt_path)

    while step < args.dit_steps:
        progress = max(step / args.dit_steps, (time.time() - t0) / budget)
        if progress >= 1:
            break
        lr = lr_at(progress, args.dit_lr, 0.04)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [rng.randrange(n) for _ in range(args.dit_batch)]
        starts = [0 if rng.random() < 0.3 else rng.randrange(tlen - WINDOW + 1) for _ in idx]
        x0 = torch.stack([lat[i, :, s:s + WINDOW] for i, s in zip(idx, starts)])
        prompts = ["" if rng.random() < args.text_dropout else caps[i] for i in idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(len(idx), gen)
        s5 = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s5) * x0 + s5 * noise
        ctx = encode_text(tok, te, prompts)
        v = dit(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
        loss = (v - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in ema_pairs:
                pe.lerp_(p.detach(), 1 - decay)
        acc.append(loss.item())
        if step % 25 == 0:
            hist.append(dict(step=step, minutes=round((time.time() - t0) / 60, 2), loss=float(np.mean(acc)),
                             lr=lr))
            acc = []
            log(f"dit step {step} ({hist[-1]['minutes']} min): flow loss {hist[-1]['loss']:.4f} lr {lr:.2e}")
        if step % args.ckpt_every == 0:
            save_ckpt()
        if step % args.export_every == 0:
            export(args, work, ema, ema_te, dit_step=step)
    save_ckpt()
    (work / "dit_losses.json").write_text(json.dumps(dict(steps=step, minutes=(time.time() - t0) / 60,
                                                          history=hist), indent=1))
    log(f"dit done: {step} steps in {(time.time() - t0) / 60:.1f} min")


def export(args, work: Path, dit=None, te=None, dit_step=None) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    if dit is None:
        ck = torch.load(work / "dit_ckpt.pt")
        dit = WanTransformer3DModel(**DIT_CFG)
        dit.load_state_dict(ck["ema"])
        te = UMT5EncoderModel.from_pretrained(str(work / "text_encoder_init"), torch_dtype=torch.float32)
        te.load_state_dict(ck["ema_te"])
        dit_step = ck["step"]
    data = torch.load(work / "latents.pt")
    vae = AutoencoderKLWan.from_pretrained(str(work / "vae"), torch_dtype=torch.float32)
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in data["mean"]],
                           latents_std=[round(float(v), 6) for v in data["std"]])
    # A fresh VAE object (no loader state in its config).
    vae2 = AutoencoderKLWan(**VAE_CFG, latents_mean=vae.config.latents_mean, latents_std=vae.config.latents_std)
    vae2.load_state_dict(vae.state_dict())
    te2 = UMT5EncoderModel(text_config(te.config.vocab_size))
    te2.load_state_dict(te.state_dict())
    pipe = WanPipeline(tokenizer=load_tokenizer(work / "tokenizer"), text_encoder=te2.eval(), vae=vae2.eval(),
                       transformer=dit, scheduler=UniPCMultistepScheduler(**UNIPC_WAN))
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    # The tokenizer was loaded from disk, which adds loader state to its config: use the built files.
    for f in (work / "tokenizer").iterdir():
        shutil.copyfile(f, tmp / "tokenizer" / f.name)
    readme = out / "README.md"
    if readme.exists():
        shutil.copyfile(readme, tmp / "README.md")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"exported to {out} (DiT step {dit_step}, {size / 1e6:.1f} MB)")


def eval_captions(args) -> list[tuple[scenes.Scene, bool]]:
    rng = random.Random(args.seed + 6)
    train = rng.sample(scenes.train_scenes(), args.eval_train)
    demo = scenes.parse_caption("a yellow square moves right on a green background")
    items = [(s, True) for s in scenes.held_out_scenes()] + [(s, False) for s in train]
    if demo not in train:
        items.append((demo, False))
    return items


@torch.no_grad()
def phase_eval(args, work: Path) -> None:
    from diffusers import WanPipeline
    from PIL import Image

    pipe = WanPipeline.from_pretrained(args.out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ev = work / "eval"
    if ev.exists():
        shutil.rmtree(ev)
    ev.mkdir(parents=True)
    results, times = [], []
    for k, (scene, held) in enumerate(eval_captions(args)):
        t = time.time()
        frames = pipe(prompt=scene.caption, num_frames=args.eval_frames, height=SIZE, width=SIZE,
                      num_inference_steps=args.eval_steps, guidance_scale=args.eval_guidance,
                      generator=torch.Generator().manual_seed(args.seed + 100 + k), output_type="np").frames[0]
        times.append(time.time() - t)
        r = scenes.score(scene, frames)
        r["held_out"] = held
        results.append(r)
        u8 = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(np.concatenate(list(u8[::8]), axis=1)).save(ev / f"{k:02d}_{'H' if held else 'T'}.png")
        log(f"eval {k}: {'held-out' if held else 'train   '} {scene.caption}: bg {r['bg_frac']:.2f} "
            f"obj {r['obj_frac']:.2f} motion {r['motion']} ({r['motion_ok']}) speed {r['speed']:.2f} "
            f"shape {r['shape']} ({r['shape_ok']}) [{times[-1]:.1f}s]")

    def summary(rs):
        if not rs:
            return {}
        return dict(n=len(rs), bg_frac=float(np.mean([r["bg_frac"] for r in rs])),
                    obj_frac=float(np.mean([r["obj_frac"] for r in rs])),
                    motion_ok=float(np.mean([r["motion_ok"] for r in rs])),
                    speed_ok=float(np.mean([r["speed_ok"] for r in rs])),
                    shape_ok=float(np.mean([r["shape_ok"] for r in rs])),
                    all_ok=float(np.mean([r["bg_frac"] > 0.9 and r["obj_frac"] > 0.9 and r["motion_ok"]
                                          and r["shape_ok"] for r in rs])))
    s = dict(steps=args.eval_steps, guidance=args.eval_guidance, frames=args.eval_frames,
             seconds_per_video=float(np.median(times)),
             held_out=summary([r for r in results if r["held_out"]]),
             train=summary([r for r in results if not r["held_out"]]), results=results)
    (work / f"eval_s{args.eval_steps}_g{args.eval_guidance:g}.json").write_text(json.dumps(s, indent=1))
    log(f"eval summary: held-out {s['held_out']}; train {s['train']}; {s['seconds_per_video']:.1f} s/video")


@torch.no_grad()
def phase_long(args, work: Path) -> None:
    """A long video as longtake renders it: tools/reference_codenoise.py's window co-denoising (21-frame
    windows, overlap 4, one scheduler step per timestep over the whole sequence), then one VAE decode."""
    from diffusers import WanPipeline
    from PIL import Image
    from reference_codenoise import codenoise

    pipe = WanPipeline.from_pretrained(args.out, torch_dtype=torch.float32)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    caps = ["a yellow square moves right on a green background", scenes.held_out_scenes()[0].caption]
    out = []
    for k, cap in enumerate(caps):
        scene = scenes.parse_caption(cap)
        t_lat = (args.long_frames - 1) // 4 + 1
        noise = torch.randn(1, 16, t_lat, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(args.seed + 200 + k))
        run = dict(prompt=cap, negative_prompt="", guidance_scale=args.eval_guidance,
                   num_inference_steps=args.eval_steps, window=WINDOW, overlap=4)
        t = time.time()
        res = codenoise(pipe, run, noise)
        t_dit = time.time() - t
        video = vae.decode(res["latents"] / inv_std + mean).sample
        t_all = time.time() - t
        frames = (video[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1).numpy()
        whole = scenes.score(scene, frames)
        chunks = [scenes.score(scene, frames[i:i + 81]) for i in range(0, len(frames) - 80, 80)]
        r = dict(caption=cap, held_out=scenes.is_held_out(scene), frames=len(frames), windows=len(res["starts"]),
                 seconds_denoise=t_dit, seconds_total=t_all, whole=whole,
                 chunks_motion_ok=float(np.mean([c["motion_ok"] for c in chunks])),
                 chunks_bg=float(np.mean([c["bg_frac"] for c in chunks])),
                 chunks_obj=float(np.mean([c["obj_frac"] for c in chunks])))
        out.append(r)
        u8 = (frames * 255).round().astype(np.uint8)
        Image.fromarray(np.concatenate(list(u8[::40]), axis=1)).save(work / f"long_{k}.png")
        log(f"long {k}: {cap}: {len(frames)} frames, {len(res['starts'])} windows, {t_dit:.0f}s denoise, "
            f"{t_all:.0f}s total; whole {whole}; per-81-frame chunks: motion ok {r['chunks_motion_ok']:.2f}, "
            f"bg {r['chunks_bg']:.2f}, obj {r['chunks_obj']:.2f}")
    (work / f"long_s{args.eval_steps}_g{args.eval_guidance:g}.json").write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "model" / "assets" / "demo-model"))
    ap.add_argument("--work", default=str(REPO / "target" / "demo-train"))
    ap.add_argument("--phase", nargs="*", default=["text", "vae", "vae2", "latents", "dit", "export", "eval", "long"],
                    choices=["text", "vae", "vae2", "latents", "vae3", "dit", "export", "eval", "long"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--vae-minutes", type=float, default=30)
    ap.add_argument("--vae-batch", type=int, default=3)
    ap.add_argument("--vae-frames", type=int, default=9)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae2-steps", type=int, default=1000)
    ap.add_argument("--vae2-minutes", type=float, default=10)
    ap.add_argument("--vae2-batch", type=int, default=1)
    ap.add_argument("--vae2-frames", type=int, default=81)
    ap.add_argument("--vae2-lr", type=float, default=5e-4)
    ap.add_argument("--vae3-steps", type=int, default=1000)
    ap.add_argument("--vae3-minutes", type=float, default=15)
    ap.add_argument("--vae3-batch", type=int, default=1)
    ap.add_argument("--vae3-frames", type=int, default=81)
    ap.add_argument("--vae3-lr", type=float, default=5e-4)
    ap.add_argument("--vae3-noise", type=float, default=0.1)
    ap.add_argument("--vae-kl", type=float, default=1e-4)
    ap.add_argument("--vae-anchor", type=float, default=1.0)
    ap.add_argument("--clips-per-scene", type=int, default=1)
    ap.add_argument("--latent-frames", type=int, default=161)
    ap.add_argument("--recon-checks", type=int, default=6, help="held-out clips reconstructed to check the VAE")
    ap.add_argument("--latent-scenes", type=int, default=0, help="encode only the first N clips (quick tests)")
    ap.add_argument("--dit-steps", type=int, default=6000)
    ap.add_argument("--dit-minutes", type=float, default=30)
    ap.add_argument("--dit-batch", type=int, default=8)
    ap.add_argument("--dit-lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--text-dropout", type=float, default=0.1)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--export-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true", help="dit: continue from the work directory's checkpoint")
    ap.add_argument("--eval-steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--eval-guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--eval-frames", type=int, default=81)
    ap.add_argument("--long-frames", type=int, default=961, help="long: frames of the co-denoised video")
    ap.add_argument("--eval-train", type=int, default=10, help="training captions evaluated besides the held-out")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import diffusers
    import transformers
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}; "
        f"threads {args.threads}; phases {args.phase}; work {args.work}; out {args.out}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps(vars(args), indent=1))
    t0 = time.time()
    for ph in args.phase:
        tp = time.time()
        {"text": phase_text, "vae": phase_vae, "vae2": lambda a, w: phase_vae(a, w, stage=2), "vae3": phase_vae3, "latents": phase_latents, "dit": phase_dit,
         "export": lambda a, w: export(a, w), "eval": phase_eval, "long": phase_long}[ph](args, work)
        log(f"phase {ph}: {(time.time() - tp) / 60:.1f} min")
    log(f"total {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
