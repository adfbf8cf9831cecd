#!/usr/bin/env python3
"""Train the demo model: a small Wan2.1 (diffusers layout) that draws the scenes of tools/scenes.py.

One command, seeded, on the CPU:

    nice -n 5 .venv/bin/python tools/train_demo.py             # all phases, then evaluation, on 2 idle cores

Phases (each resumes from the work directory, default target/demo-train/, so a phase can be rerun alone
with --phase):
  1. text     the tokenizer (a Unigram model whose pieces are the grammar's words, plus single characters
              so that other text does not become <unk>; written through transformers' T5Tokenizer, the
              same file layout as umt5-xxl's) and a freshly initialised UMT5EncoderModel.
  2. vae      AutoencoderKLWan (base_dim 8, z_dim 16, dim_mult [1,2,4,4], 1 res block) trained through the
              same cached chunk loops that diffusers' encode / decode run (first frame alone, then 4-frame
              chunks; the decoder one latent frame at a time), batch 2, L1 + MSE on [-1, 1] pixels without
              the decoder's final clamp, a small KL term, and an anchor pulling latent channels 0-2 towards
              the clip's colours averaged per latent cell. Each step grades --vae-frames (17 = 1 + 4*4)
              pixel frames: from the start of a video, or (probability --vae-warm-prob) right after a
              warm-up prefix of 1..--vae-warm-max latent frames that is encoded and decoded without
              gradients only to fill the causal convolutions' caches. So every cache state a long video
              reaches is trained, including the steady state past the decoder's temporal receptive field
              (~25 latent frames), at the cost of a forward pass over the prefix. (A VAE trained on
              9-frame clips from the start only broke down after frame 9.)
     vae2     (optional, not in the default phases) the same VAE continued on whole --vae2-frames clips.
  3. latents  every training scene is rendered as --clips-per-scene (2) long clips (161 frames, each at
              its own random position) and encoded (posterior mean) to 41 latent frames; the per-channel mean / std over all of them
              become the VAE config's latents_mean / latents_std, and the cached latents are normalised
              as WanPipeline expects: (z - mean) / std. Then 161-frame held-out clips are reconstructed
              with diffusers' own encode / decode and the per-frame L1 is written to vae_recon.json.
     vae3     decoder-only fine-tuning (encoder frozen, so the cached latents stay valid) on noisy posterior
              means, streamed like phase vae, with the object's pixels weighted 4x; writes work/vae3/, which
              export uses. It does not depend on the dit phase (the two can run at once). The last decoder phase
              of a run (vae3, vae4 or vae5) also writes <phase>_recon.json (as vae_recon.json above); both checks
              warn in the log when a decoder draws a clip's named colours in under 90 % of its frames.
     vae4     phase vae3 continued (fresh schedule, --vae4-steps, peak --vae4-lr) with 5x the noise
              (--vae4-noise 0.5 x the std): a decoder that has seen more of the latent space around the
              encoder's codes draws generated latents with cleaner object colours. Writes work/vae4/ (export
              prefers it). --vae4-from vae starts it from phase vae's decoder instead, for runs that leave
              phase vae3 out.
  4. dit      WanTransformer3DModel and the text encoder trained together with Wan's flow matching on
              crops of the cached 41-frame latent sequences, as the render's windows are crops of one long
              latent sequence: 21 latent frames (the render window) with probability --dit-full-prob, else
              --dit-short frames with a proportionally larger batch (same latent frames per step, more
              captions); a crop starts at latent frame 0 with probability 0.3, else at a random offset.
              sigma = shift*u / (1 + (shift-1)*u), u ~ U(0, 1), shift = flow_shift (3.0) - the same
              shifted sigmas the UniPC sampler steps through - timestep = 1000*sigma,
              x_t = (1 - sigma) x0 + sigma * noise, target = noise - x0, MSE weighted per latent cell by
              1 + --dit-obj-weight * min(1, d / OBJ_DEV) (d: the cell's mean absolute difference from
              its frame's background, the per-channel spatial median; weights normalised to mean 1), so
              that the object counts once the background is learnt. 10% of the captions are replaced
              by the empty prompt (classifier-free guidance). The text goes through WanPipeline's
              path (tokens + </s>, encoder, real rows kept, zero rows up to 512); training computes the
              cross-attention over the 502-odd identical zero rows exactly but cheaply (CompactCrossAttn).
              An exponential moving average of the transformer's and text encoder's weights is exported.
     dir      --dir-steps (1650) more of phase dit from its final
              weights (fresh optimiser and schedule, peak --dir-lr) in which --dit-mix-frac (80%) of the
              captioned items get an ambiguous input (class Ambiguity): a blend of the clip and a clip of
              the same object with another motion (another direction or still), the target the velocity
              towards the captioned clip alone, so that only the text tells which motion to keep;
              --dit-mix-opposite is the share of blends whose other clip moves the opposite way where the
              training set has that scene (else any other motion, partners of the other axis too). Trained
              only on real clips, the transformer learns the scenes' motion but not to take its direction
              from the text; this phase teaches it the axis (left/right against up/down against still).
              (--dit-mix-start < 1 mixes such inputs into phase dit itself after that fraction of it.)
              Its crops are 21 frames long with probability --dir-full-prob (default 0), else --dit-short:
              short crops only (more captions per step) at the peak lr --dir-lr 1e-3 taught direction
              fastest in the measured runs (the demo model's MEASUREMENTS.md). With --dir-twins F (phases dir and
              opp), a share F of the blends goes in a second time with the other clip's caption and the
              velocity towards the other clip: the same noisy input read both ways in one batch, so the
              gradient that ties the motion word to the motion is not averaged away with the rest. From a
              phase dit whose phase dir learnt nothing (seed 1), F 0.5 taught the axis (the demo model's
              MEASUREMENTS.md, "Twin blends"); --dir-text-lr M (the text encoder and cross-attention at M times
              the peak lr) did not. Twins also need phase opp's full step count: under --total-minutes 88
              at seed 0, phase opp got 520 of its 1000 steps and the model drew moving objects long along
              their motion; the default recipe gives phases dit, dir and opp budgets that their step
              counts fit (--dir-twins 0.5 is the default; 0 turns twins off). The log prints the blends'
              own flow loss, which drops once the text decides.
     opp      --opp-steps (1150) more from phase dir's weights (fresh
              optimiser, peak --opp-lr), every blend partner moving the opposite way where the training set
              has that scene: the sign. Phases dir and opp export to --out at their ends. With
              --contrast-frac F (default 0.2 in the phases --contrast-phases, default ar only), a share F of each
              step's crops also goes in twice more as a colour pair: the plain crop at a noise level in
              --contrast-sigma (0.6-1) with its caption and with the object's colour word replaced by another
              colour (the first copy also joins the flow loss unless --no-contrast-flow), and a hinge asks the
              object cells' error with the wrong word to exceed the true word's by --contrast-margin
              (relative). With --contrast-nearest S (default 0) a share S of the wrong words is the colour
              nearest the object's in RGB (yellow for a white or a red object), the word a model confuses
              most (tools/probe_colour.py: on red, the yellow word cost a white object's clips 2 % more
              than the true word at sigma 0.95). Where a sampler settles the object's colour, at
              the highest noise, a transformer trained on the flow loss alone ignored the colour word for
              some colour pairs (tools/probe_colour.py) and drew a hedge between two colours.
     ar       (after phase vae5, so that phase learns from phase opp's transformer) --ar-steps (600) more
              from phase opp's EMA weights (or those of an exported model directory, --ar-from DIR; fresh
              optimiser, peak --ar-lr 2e-4) on
              21-frame crops, the render's window, --ar-mix-frac (30%) of the captioned items ambiguous as in
              phase opp; of the other crops that do not start at latent frame 0, a share --ar-ctx-frac has
              its first --ar-hold (8) latent frames replaced by the transformer's own one-step prediction of
              them from a noise level in --ar-ctx-sigma, as an autoregressive window holds the previous
              window's result, and the loss leaves those frames out; a share --ar-ctx-widen (0.7) of those
              holds the clip's own frames widened across one or both spatial axes instead (as hand-overs
              widen a drawn object), and --ar-hold-noise H (0.7) noises the held frames to H times the step's
              noise level (longtake's --hold-noise, the demo model's default); with colour pairs
              (--contrast-frac, --contrast-phases). Exports to --out at its end. The demo model's MEASUREMENTS.md
              measures it and the variants tried.
     vae5     (after phase opp) the latest decoder fine-tuned on the transformer's own latents: a training
              clip is encoded, noised to sigma ~ U(0.05, --vae5-sigma-max), the trained transformer predicts
              its clean latents in one step with the clip's caption, and the decoder learns to draw the clip
              from that prediction (with --vae5-guidance G > 1, the classifier-free-guided prediction, as the
              sampler combines them; measured worse at G 2, so the default is 1). Writes work/vae5/ (export
              prefers it).
  5. export   WanPipeline(...).save_pretrained(--out) with UniPCMultistepScheduler (Wan's settings,
              flow_shift 3.0), all weights f32, from the EMA weights of the most recently trained of
              phases dit, dir, opp and ar. Also written every --export-every DiT steps, so a usable model
              exists while training runs.
  6. eval     WanPipeline.from_pretrained(--out) generates 81 frames (64x64) for every held-out caption and
              some training captions; tools/scenes.py's checker scores them; eval.json + PNG strips go
              to the work directory.
  7. long     961-frame (60 s) videos of LONG_CAPTIONS (the example prompt, three held-out captions, two
              training captions) with tools/reference_codenoise.py's loops (21-frame windows, the
              stitching and overlap of the model's longtake.json), as longtake renders them, scored whole
              and per 81 frames, and checked for jumps at the windows' seams. Phases eval and long sample
              with the steps and guidance of that longtake.json unless --eval-steps / --eval-guidance say.

Each training phase stops at its step count or its wall-clock budget (--vae-minutes, --vae3-minutes,
--vae4-minutes, --vae5-minutes, --dit-minutes, --dir-minutes, --opp-minutes, --ar-minutes), whichever
comes first. The learning-rate schedule (and the data a phase draws) follows the step fraction alone
while the step count fits the budget; when, at the pace so far, it would not, the step count is shortened
to what fits and the log says so (class Clock: the pace is measured from the phase's 20th step, and the
count is cut only when the projected finish overruns the budget by more than 3 %), so a phase cut short
still ends with a decayed learning rate. Runs whose phases finish their step counts are reproducible from
the seed; runs that cut a step count depend on the machine's speed. On top of that, --total-minutes
(default 88) bounds the whole run up to export: before each transformer phase, if what is left of it
(less phase vae5's budget and export) is less than the budgets of that phase and the transformer phases
after it, their budgets shrink in proportion (each to a quarter at least), and the log says so. The VAE
phases keep theirs: the VAE needs its full step count (below).

torch runs with --threads (default 2). On a 2-core machine that does nothing else meanwhile, two threads
make a DiT step 0.42-0.47 s instead of 0.67 s; the VAE phases gain little (their steps take about as
long as with one thread). On a machine shared with other work use --threads 1: a 2-thread pool
spin-waits whenever the other core is busy and runs several times slower than one thread. The default
phases up to export took 84.0 minutes at two threads on an idle 2-core machine, every phase finishing
its step count within its budget (the demo model's README has every phase's time). The phases' own time
budgets add up to about 92 minutes with the latents phase; on a slower machine the run-wide budget
shortens the transformer phases. A
run that stops a phase on time is not step-for-step reproducible. The VAE needs its full step count: in
a run whose phase vae stopped on a 20-minute budget at 983 steps, 4 of the 8 held-out check clips came back
with the object in the wrong colour in 90-96% of their frames.
"""

from __future__ import annotations

import argparse
import itertools
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
# The acceptance bar's colour share: the named background and object in at least this share of the frames.
COLOUR_BAR = 0.9
FLOW_SHIFT = 3.0
WINDOW = 21  # latent frames per DiT training window (81 pixel frames)
OBJ_DEV = 0.5  # dit: a latent cell this far (mean |z - background| over channels) from the background is object
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
VAE_STAGES = ("vae5", "vae4", "vae3", "vae")  # the VAE export takes: the latest of these in the work directory
EXTRA_IDS = 4
# What longtake renders a model directory with when its longtake.json does not say (eval and long follow it).
RENDER_FALLBACK = dict(steps=50, guidance=5.0, stitching="codenoise", overlap=4)


def share(text: str) -> float:
    """argparse type of the share and probability flags: a value outside [0, 1] would act as 0 or 1 without a
    word, so it is refused by name."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share: from 0 to 1")
    return value


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


class Clock:
    """A phase's place in its schedule. Progress is the fraction of the phase's step count done, so a run
    whose phases all finish their step counts within their wall-time budgets follows the same learning-rate
    path and draws the same data whatever the machine's speed, and repeats from its seed. Every `check`
    steps the pace since the phase's first `settle` steps (which carry its start-up costs) projects the
    finish; if that overruns the budget by more than `slack`, the step count is shortened to what fits (it
    never grows back) and the log says so, so the learning rate still anneals before the budget runs out.
    At the end of the budget progress is 1 whatever the step (within `slack` that is near the schedule's
    end anyway)."""

    def __init__(self, name: str, steps: int, minutes: float, spent: float = 0.0, check: int = 50,
                 settle: int = 20, slack: float = 0.03):
        self.name, self.steps, self.budget = name, steps, minutes * 60
        self.check, self.settle, self.slack = check, settle, slack
        self.t0 = time.time() - spent
        self.first: int | None = None
        self.mark: tuple[int, float] | None = None

    def progress(self, step: int) -> float:
        now = time.time()
        elapsed = now - self.t0
        if elapsed >= self.budget:
            return 1.0
        if self.first is None:
            self.first = step
        if self.mark is None:
            if step >= self.first + self.settle:
                self.mark = (step, now)
        elif (step - self.mark[0]) % self.check == 0 and step > self.mark[0]:
            pace = (now - self.mark[1]) / (step - self.mark[0])
            if elapsed + (self.steps - step) * pace > self.budget * (1 + self.slack):
                fits = max(step + 1, step + int((self.budget - elapsed) / pace))
                log(f"{self.name}: step count {self.steps} -> {fits}, to end within its "
                    f"{self.budget / 60:.1f}-minute budget at {pace:.2f} s/step")
                self.steps = fits
        return step / self.steps


def to_pixels(clip: np.ndarray) -> torch.Tensor:
    """uint8 [F,H,W,3] -> float [3,F,H,W] in [-1, 1]."""
    return torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def from_pixels(video: torch.Tensor) -> np.ndarray:
    """to_pixels' inverse for the scene checker: the first video of float [B,3,F,H,W] in [-1, 1] ->
    [F,H,W,3] in [0, 1] (clamped)."""
    return (video[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1).numpy()


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


def encode_chunks(vae, x: torch.Tensor, first: bool) -> torch.Tensor:
    """AutoencoderKLWan._encode's chunk loop (first frame alone, then 4-frame chunks) continuing from the
    caches already in vae._enc_feat_map; `first`: x starts at frame 0 of the video. Returns quant_conv's
    output [B, 2*z_dim, T, h, w] (mean, logvar)."""
    outs = []
    i = 0
    if first:
        vae._enc_conv_idx = [0]
        outs.append(vae.encoder(x[:, :, :1], feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
        i = 1
    while i < x.shape[2]:
        vae._enc_conv_idx = [0]
        outs.append(vae.encoder(x[:, :, i:i + 4], feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
        i += 4
    return vae.quant_conv(torch.cat(outs, 2))


def decode_chunks(vae, z: torch.Tensor, first: bool) -> torch.Tensor:
    """AutoencoderKLWan._decode's frame-by-frame loop without the final clamp (whose zero gradient would trap
    outputs that overshoot on the wrong side), continuing from the caches in vae._feat_map."""
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=first and i == 0))
    return torch.cat(outs, 2)


def vae_stream_step(vae, x: torch.Tensor, warm: int):
    """One training pass over a clip x [B,3,1+4(warm+G-1) or so,H,W] as the cached inference pass sees it: the
    first `warm` latent frames (1 + 4(warm-1) pixel frames) are encoded and decoded without gradients, only to
    fill the causal convolutions' caches, then the rest is encoded / decoded with gradients. With warm = 0 the
    graded part starts at frame 0 (the single-frame first chunk). Returns (graded pixels, their
    reconstruction, posterior mean, logvar, sampled latent)."""
    vae.clear_cache()
    if warm > 0:
        nw = 1 + 4 * (warm - 1)
        with torch.no_grad():
            enc = encode_chunks(vae, x[:, :, :nw], True)
            mu_w, lv_w = enc.chunk(2, dim=1)
            zw = mu_w + torch.exp(0.5 * lv_w.clamp(-30, 20)) * torch.randn_like(mu_w)
            decode_chunks(vae, zw, True)
        vae._enc_feat_map = [None if f is None else (f.detach() if torch.is_tensor(f) else f)
                             for f in vae._enc_feat_map]
        vae._feat_map = [None if f is None else (f.detach() if torch.is_tensor(f) else f) for f in vae._feat_map]
        xg = x[:, :, nw:]
    else:
        xg = x
    enc = encode_chunks(vae, xg, warm == 0)
    mu, logvar = enc.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    y = decode_chunks(vae, z, warm == 0)
    vae.clear_cache()
    return xg, y, mu, logvar


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
    clock = Clock(f"vae{stage}", n_steps, minutes)
    t0 = clock.t0
    hist, acc = [], []
    step = 0
    while step < n_steps:
        progress = clock.progress(step)
        if progress >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, base_lr, 0.03)
        # The graded part: `frames` pixel frames (1 + 4k) from the start of the video for `batch` clips, or,
        # with probability --vae-warm-prob once --vae-warm-start of the phase is done (stage 1),
        # --vae-warm-frames frames (4k) of --vae-warm-batch clips that follow `warm` latent frames encoded /
        # decoded without gradients, so that the caches of the causal convolutions are in every state a long
        # video puts them in (the decoder's temporal receptive field spans ~25 latent frames). Many scenes
        # per step matter more than long graded clips: consecutive frames of one scene are nearly redundant.
        warm, bsz = 0, batch
        if stage == 1 and progress >= args.vae_warm_start and rng.random() < args.vae_warm_prob:
            warm, bsz = rng.randint(1, args.vae_warm_max), args.vae_warm_batch
        n_pix = frames if warm == 0 else 1 + 4 * (warm - 1) + args.vae_warm_frames
        x = torch.stack([to_pixels(scenes.render(rng.choice(train), n_pix, SIZE, SIZE,
                                                 seed=rng.getrandbits(32)))
                         for _ in range(bsz)])
        x, y, mu, logvar = vae_stream_step(vae, x, warm)
        rec_l1 = (y - x).abs().mean()
        rec_mse = (y - x).pow(2).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        # Anchor: latent channels 0-2 are pulled towards the clip's colours averaged over each latent cell
        # (8x8 pixels, and the frames a latent frame covers), which gives the decoder an informative latent
        # from the first steps.
        b, _, t, h, w = x.shape
        if warm == 0:
            anchor = torch.cat([x[:, :, :1], x[:, :, 1:].reshape(b, 3, (t - 1) // 4, 4, h, w).mean(3)], 2)
        else:
            anchor = x.reshape(b, 3, t // 4, 4, h, w).mean(3)
        anchor = torch.nn.functional.avg_pool3d(anchor, (1, 8, 8))
        aux = (mu[:, :3] - anchor).pow(2).mean()
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
                             kl=float(a[2]), anchor=float(a[3]), lr=opt.param_groups[0]["lr"]))
            log(f"vae{stage} step {step} ({hist[-1]['minutes']} min): L1 {a[0]:.4f} MSE {a[1]:.5f} KL {a[2]:.3f} "
                f"anchor {a[3]:.4f}")
        if step % 100 == 0:
            vae.save_pretrained(str(work / "vae"), safe_serialization=True)
    vae.save_pretrained(str(work / "vae"), safe_serialization=True)
    (work / f"vae{stage}_losses.json").write_text(json.dumps(dict(steps=step, minutes=(time.time() - t0) / 60,
                                                                  frames=frames, batch=batch, history=hist), indent=1))
    log(f"vae{stage} done: {step} steps in {(time.time() - t0) / 60:.1f} min")


def train_decoder(args, work: Path, stage: str, vae, max_steps: int, minutes: float, lr: float, batch) -> None:
    """The loop of the decoder-only phases (vae3, vae4, vae5). The encoder stays frozen, so the cached latents
    and the transformer trained on them stay valid. Each step `batch()` returns the decoder's output (with
    gradients), the pixels it should match and each clip's background colour [B, 3]; the loss is L1 + MSE
    on [-1, 1] pixels with the object's pixels (those that differ from the background) weighted
    --vae3-obj-weight times: the object is ~14% of a frame and its colour is what a decoder learns last.
    Saves work/<stage>/ every 100 steps and at the end, writes <stage>_losses.json and, when this is the
    run's last decoder phase, <stage>_recon.json."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    clock = Clock(stage, max_steps, minutes)
    t0 = clock.t0
    hist, acc, step = [], [], 0

    def save():
        tmp = work / f"{stage}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        vae.save_pretrained(str(tmp), safe_serialization=True)
        if (work / stage).exists():
            shutil.rmtree(work / stage)
        tmp.rename(work / stage)

    while step < max_steps:
        progress = clock.progress(step)
        if progress >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, lr, 0.03)
        y, x, bg = batch()
        obj = ((x - bg.view(-1, 3, 1, 1, 1)).abs().sum(1, keepdim=True) > 0.1).float()
        wgt = 1 + (args.vae3_obj_weight - 1) * obj
        wgt = wgt / wgt.mean()
        l1 = ((y - x).abs() * wgt).mean()
        mse = ((y - x).pow(2) * wgt).mean()
        opt.zero_grad(set_to_none=True)
        (l1 + mse).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc.append((l1.item(), mse.item(), (y - x).abs().mean().item()))
        if step % 25 == 0:
            a = np.mean(acc, axis=0)
            acc = []
            hist.append(dict(step=step, minutes=round((time.time() - t0) / 60, 2), l1_weighted=float(a[0]),
                             mse_weighted=float(a[1]), l1=float(a[2])))
            log(f"{stage} step {step} ({hist[-1]['minutes']} min): weighted L1 {a[0]:.4f} MSE {a[1]:.5f}, L1 {a[2]:.4f}")
        if step % 100 == 0:
            save()
    save()
    (work / f"{stage}_losses.json").write_text(json.dumps(dict(steps=step, minutes=(time.time() - t0) / 60,
                                                               history=hist), indent=1))
    log(f"{stage} done: {step} steps in {(time.time() - t0) / 60:.1f} min")
    if is_last_vae_phase(args, stage):
        vae.eval()
        with torch.no_grad():
            recon_check(args, work, vae, f"{stage}_recon.json")


def background_pixels(items: list[scenes.Scene]) -> torch.Tensor:
    """Each scene's background colour in [-1, 1] pixels, [B, 3]."""
    return torch.stack([torch.tensor(scenes.COLOURS[sc.bg], dtype=torch.float32) / 127.5 - 1 for sc in items])


def phase_vae3(args, work: Path, stage: str = "vae3") -> None:
    """Decoder-only fine-tuning after the latents are cached (train_decoder): the decoder sees the posterior
    mean plus a little noise (--vae3-noise x the latents' per-channel std), for robustness to imperfect
    generated latents, through the same streamed steps as phase vae (warm-up prefixes included). Writes
    work/vae3/ (export prefers it to work/vae/).

    Stage vae4 continues phase vae3's decoder (work/vae3/) the same way with more noise (--vae4-noise x the
    std): generated latents stray further from the encoder's than the posterior's own spread, and a decoder
    that has seen more of that neighbourhood draws the objects' colours more faithfully (the demo model's
    README). Writes work/vae4/ (export prefers it)."""
    from diffusers import AutoencoderKLWan

    source, max_steps, minutes, lr, noise = {
        "vae3": ("vae", args.vae3_steps, args.vae3_minutes, args.vae3_lr, args.vae3_noise),
        "vae4": (args.vae4_from, args.vae4_steps, args.vae4_minutes, args.vae4_lr, args.vae4_noise)}[stage]
    if not (work / source).is_dir():
        flag = " (--vae4-from: vae3 or vae)" if stage == "vae4" else ""
        raise SystemExit(f"{stage}: {work / source} is missing; run phase {source} first{flag}")
    torch.manual_seed(args.seed + 22)
    rng = random.Random(args.seed + 22)
    vae = AutoencoderKLWan.from_pretrained(str(work / source), torch_dtype=torch.float32)
    _, std = latent_stats(work)
    train = scenes.train_scenes()

    def batch():
        warm, bsz, n_pix = 0, args.vae_batch, args.vae_frames
        if rng.random() < args.vae_warm_prob:
            warm, bsz = rng.randint(1, args.vae_warm_max), args.vae_warm_batch
            n_pix = 1 + 4 * (warm - 1) + args.vae_warm_frames
        items = [rng.choice(train) for _ in range(bsz)]
        x = torch.stack([to_pixels(scenes.render(sc, n_pix, SIZE, SIZE, seed=rng.getrandbits(32))) for sc in items])
        vae.clear_cache()
        with torch.no_grad():
            z = encode_chunks(vae, x, True)[:, :VAE_CFG["z_dim"]]
            z = z + noise * std * torch.randn_like(z)
            nw = 0
            if warm > 0:
                nw = 1 + 4 * (warm - 1)
                decode_chunks(vae, z[:, :, :warm], True)
                vae._feat_map = [f.detach() if torch.is_tensor(f) else f for f in vae._feat_map]
        y = decode_chunks(vae, z[:, :, warm:], warm == 0)
        vae.clear_cache()
        return y, x[:, :, nw:], background_pixels(items)

    train_decoder(args, work, stage, vae, max_steps, minutes, lr, batch)


def phase_vae5(args, work: Path) -> None:
    """Decoder-only fine-tuning (train_decoder) on the transformer's own latents: a training clip of
    --vae5-frames frames is encoded, normalised, noised to sigma ~ U(0.05, --vae5-sigma-max), and the trained
    transformer (the EMA weights export takes) predicts its clean latents in one step, x_t - sigma v, with the
    clip's caption; the decoder learns to draw the clip's pixels from that prediction. The transformer's
    latents differ from the encoder's in its own ways (objects too large, soft edges that decode as dark or
    coloured fringes), and a decoder that has seen them draws cleaner objects. Continues the latest decoder
    (work/vae4/ after phase vae4); writes work/vae5/ (export prefers it)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed + 24)
    rng = random.Random(args.seed + 24)
    source = next(work / d for d in VAE_STAGES[1:] if (work / d).exists())
    vae = AutoencoderKLWan.from_pretrained(str(source), torch_dtype=torch.float32)
    mean, std = latent_stats(work)
    dit, te, dit_step = trained_transformer(work)
    dit.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    tok = load_tokenizer(work / "tokenizer")
    train = scenes.train_scenes()
    log(f"vae5: decoder of {source.name}, transformer step {dit_step}")

    def batch():
        items = [rng.choice(train) for _ in range(args.vae5_batch)]
        x = torch.stack([to_pixels(scenes.render(sc, args.vae5_frames, SIZE, SIZE, seed=rng.getrandbits(32)))
                         for sc in items])
        with torch.no_grad():
            vae.clear_cache()
            zn = (encode_chunks(vae, x, True)[:, :VAE_CFG["z_dim"]] - mean) / std
            vae.clear_cache()
            sigma = torch.tensor([rng.uniform(0.05, args.vae5_sigma_max) for _ in items]).view(-1, 1, 1, 1, 1)
            xt = (1 - sigma) * zn + sigma * torch.randn_like(zn)
            t = sigma.flatten() * 1000
            v = dit(hidden_states=xt, timestep=t,
                    encoder_hidden_states=encode_text(tok, te, [sc.caption for sc in items]), return_dict=False)[0]
            if args.vae5_guidance > 1:
                # Classifier-free guidance, as the sampler combines the two predictions.
                v_u = dit(hidden_states=xt, timestep=t, encoder_hidden_states=encode_text(tok, te, [""] * len(items)),
                          return_dict=False)[0]
                v = v_u + args.vae5_guidance * (v - v_u)
            z = (xt - sigma * v) * std + mean
        y = decode_chunks(vae, z, True)
        vae.clear_cache()
        return y, x, background_pixels(items)

    train_decoder(args, work, "vae5", vae, args.vae5_steps, args.vae5_minutes, args.vae5_lr, batch)


def is_last_vae_phase(args, stage: str) -> bool:
    """Whether `stage` is the last of the decoder phases (vae3, vae4, vae5) this run trains: only that one
    checks its reconstructions (about half a minute each)."""
    return [p for p in args.phase if p in VAE_STAGES[:3]][-1:] == [stage]


def recon_check(args, work: Path, vae, name: str) -> None:
    """161-frame held-out clips through diffusers' own (cached, clamped) encode and decode: L1 per pixel frame
    (pixels in [-1, 1]) and the scene checker's figures."""
    recon = []
    for k, sc in enumerate(scenes.held_out_scenes()[:args.recon_checks]):
        clip = scenes.render(sc, args.latent_frames, SIZE, SIZE, seed=1000 + k)
        x = to_pixels(clip)[None]
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        frames = from_pixels(y)
        r = scenes.score(sc, frames)
        per_frame = (y - x).abs().mean(dim=(0, 1, 3, 4))
        recon.append(dict(caption=sc.caption, l1=float((y - x).abs().mean()), mse=float((y - x).pow(2).mean()),
                          l1_max_frame=float(per_frame.max()), l1_argmax_frame=int(per_frame.argmax()),
                          l1_frames_0_20=float(per_frame[:21].mean()), l1_frames_21_80=float(per_frame[21:81].mean()),
                          l1_frames_81_end=float(per_frame[81:].mean()),
                          bg_frac=r["bg_frac"], obj_frac=r["obj_frac"], motion_ok=r["motion_ok"],
                          motion_agreement=r["motion_agreement"], shape_ok=r["shape_ok"],
                          l1_per_frame=[round(float(v), 4) for v in per_frame]))
        log(f"recon {sc.caption}: " + str({k: v for k, v in recon[-1].items() if k != "l1_per_frame"}))
    (work / name).write_text(json.dumps(recon, indent=1))
    # A decoder that loses a scene's colours here loses them in every render of it: say so where it shows.
    short = [f"{r['caption']} (background {r['bg_frac']:.0%}, object {r['obj_frac']:.0%})" for r in recon
             if min(r["bg_frac"], r["obj_frac"]) < COLOUR_BAR]
    if short:
        log(f"WARNING {name}: the decoder draws the named colours in under {COLOUR_BAR:.0%} of the frames of: "
            + "; ".join(short))


def latent_stats(work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase latents' per-channel mean and std, shaped to broadcast over [N, C, T, H, W]; the cached latents
    themselves are memory-mapped, not read."""
    data = torch.load(work / "latents.pt", mmap=True)
    return data["mean"].view(1, -1, 1, 1, 1).clone(), data["std"].view(1, -1, 1, 1, 1).clone()


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
    recon_check(args, work, vae, "vae_recon.json")
    log(f"latents: {tuple(z.shape)} in {(time.time() - t0) / 60:.1f} min; mean {mean.numpy().round(3).tolist()} "
        f"std {std.numpy().round(3).tolist()}")


class CompactCrossAttn:
    """Training-only cross-attention processor, exact for WanPipeline's padded text: the pipeline pads the
    prompt embeddings with zero rows to 512, and every zero row gives the same key and value (norms and
    projections act per row), so softmax attention over them equals attention over one of them with
    log(count) added to its logit. The transformer gets [real rows, zero rows up to the batch's longest
    prompt + 1] and self.bias [B,1,1,S] spreads the pad count over each item's zero rows. About 40% of a
    training step's time at 512 rows; the exported model uses diffusers' own processor on 512 rows."""

    bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def encode_text_compact(tok, te, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_text's rows in CompactCrossAttn's form: ([B, S, D] real rows then zero rows, bias [B,1,1,S])."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    enc = tok([prompt_clean(p) for p in prompts], padding="longest", truncation=True, max_length=TEXT_LEN,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    hidden = te(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    hidden = hidden * enc.attention_mask[..., None].to(hidden.dtype)
    b, s = enc.input_ids.shape
    out = torch.cat([hidden, hidden.new_zeros(b, 1, hidden.shape[-1])], 1)
    lens = enc.attention_mask.sum(1)
    pad_rows = (s + 1 - lens).float()  # zero rows per item here
    bias = torch.zeros(b, s + 1)
    is_pad = torch.arange(s + 1)[None, :] >= lens[:, None]
    bias = torch.where(is_pad, torch.log((TEXT_LEN - lens).float() / pad_rows)[:, None], bias)
    return out, bias.view(b, 1, 1, s + 1)


def background_distance(z: torch.Tensor) -> torch.Tensor:
    """For latent frames z [..., C, H, W]: each cell's mean absolute difference over channels from its
    frame's background, the per-channel spatial median ([..., H, W])."""
    med = z.flatten(-2).median(dim=-1).values[..., None, None]
    return (z - med).abs().mean(dim=-3)


def object_cell(z: torch.Tensor) -> tuple[int, int]:
    """The latent cell at the centre of the object in one latent frame z [C, H, W]: the cell whose 3x3
    neighbourhood (wrapping, as the scenes do) differs most from the frame's background."""
    d = background_distance(z)
    d = sum(torch.roll(d, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    k = int(d.flatten().argmax())
    return k // d.shape[1], k % d.shape[1]


OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


class Ambiguity:
    """Inputs whose motion is ambiguous, for phase dir (and phase dit after --dit-mix-start).

    A sampler decides where the object goes at high noise, where the input shows faint blobs whose motion
    is not yet settled; trained only on real clips, whose noisy input already shows the trajectory
    wherever the object is visible at all, the transformer never learns to take the direction from the
    text (it explains about 1 % of the flow loss). Here the input is built from a blend of the crop and a
    crop of the same object and background with another motion (another direction or still), rolled so
    that both objects sit on the same latent cell in the middle frame: x_t = (1 - sigma) (a x0 + (1 - a)
    x0_other) + sigma noise, a ~ U(--dit-mix-weight), sigma ~ U(--dit-mix-sigma), and the target is the
    velocity towards the captioned clip alone, (x_t - x0) / sigma. Only the caption tells which of the two
    motions to keep."""

    def __init__(self, lat: torch.Tensor, caps: list[str]):
        self.lat = lat
        self.scene = [scenes.parse_caption(c) for c in caps]
        self.by_look: dict[tuple, dict[str, list[int]]] = {}
        for i, s in enumerate(self.scene):
            self.by_look.setdefault((s.obj, s.shape, s.bg), {}).setdefault(s.motion, []).append(i)

    def blend(self, rng: random.Random, i: int, start: int, win: int, weight: tuple[float, float],
              opposite: float) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(a x0 + (1 - a) x0_other, x0_other, j) for clip i's crop [start, start + win), x0_other being the
        other clip j's crop rolled onto the object's cell; the other clip moves the opposite way with
        probability `opposite` (when the training set has that scene), else any other motion."""
        s = self.scene[i]
        others = self.by_look[(s.obj, s.shape, s.bg)]
        motion = OPPOSITE.get(s.motion)
        if motion not in others or rng.random() >= opposite:
            motion = rng.choice(sorted(m for m in others if m != s.motion))
        j = rng.choice(others[motion])
        sj = rng.randrange(self.lat.shape[2] - win + 1)
        x0 = self.lat[i, :, start:start + win]
        other = self.lat[j, :, sj:sj + win]
        (ya, xa), (yb, xb) = object_cell(x0[:, win // 2]), object_cell(other[:, win // 2])
        other = torch.roll(other, (ya - yb, xa - xb), dims=(2, 3))
        a = rng.uniform(*weight)
        return a * x0 + (1 - a) * other, other, j


def widen_held(frames: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A clip's latent frames [C, T, H, W] with the object widened as autoregressive hand-overs widen it: each
    frame spread over its neighbouring latent cells along one spatial axis (or both), one or two times,
    (1 - b) * x + b/2 * (x shifted by one cell either way) with b ~ U(0.25, 0.67), wrapping at the edges as
    the scenes do. Phase ar holds these (--ar-ctx-widen) so that the window's own frames learn to draw the
    object at its size after a held object drawn too wide."""
    axes = rng.choice([(2,), (3,), (2, 3)])
    out = frames
    for _ in range(rng.choice([1, 2])):
        for ax in axes:
            b = rng.uniform(0.25, 0.67)
            out = (1 - b) * out + b / 2 * (out.roll(1, dims=ax) + out.roll(-1, dims=ax))
    return out


def smear_held(frames: torch.Tensor, caption: str, rng: random.Random) -> torch.Tensor:
    """Held latent frames [C, T, H, W] with the object smeared into a streak along its motion, as some
    autoregressive renders draw a moving object as a column: (1 - b) * x + b * (x averaged along the motion's
    axis), b ~ U(0.3, 0.9); a still object along either axis. The window must draw the object whole again."""
    dx, dy = scenes.VELOCITY[scenes.parse_caption(caption).motion]
    axis = 2 if dy else 3 if dx else rng.choice([2, 3])  # latent [C, T, H, W]: H is y, W is x
    b = rng.uniform(0.3, 0.9)
    return (1 - b) * frames + b * frames.mean(dim=axis, keepdim=True)


def wrong_colour(rng: random.Random, caption: str, nearest: float = 0.0) -> str:
    """The caption with the object's colour replaced by another colour that is not the background's: with
    probability `nearest` (--contrast-nearest) the one nearest the object's in RGB (the word a model
    confuses most: yellow for white on red), else any. At 0 no extra draw is made."""
    s = scenes.parse_caption(caption)
    others = [c for c in scenes.COLOURS if c not in (s.obj, s.bg)]
    if nearest > 0 and rng.random() < nearest:
        rgb = scenes.COLOURS[s.obj]
        other = min(others, key=lambda c: sum(abs(a - b) for a, b in zip(scenes.COLOURS[c], rgb)))
    else:
        other = rng.choice(others)
    return scenes.Scene(other, s.shape, s.bg, s.motion).caption


def parse_boost(text: str) -> tuple[str, str, float]:
    """'white:red=4' -> ('white', 'red', 4.0): object colour, background colour, weight."""
    try:
        pair, weight = text.split("=")
        obj, bg = pair.split(":")
        w = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OBJECT:BACKGROUND=WEIGHT (e.g. white:red=4), got {text!r}")
    for c in (obj, bg):
        if c not in scenes.COLOURS:
            raise argparse.ArgumentTypeError(f"unknown colour {c!r} in {text!r}; colours: {', '.join(scenes.COLOURS)}")
    if obj == bg or not (w > 0 and math.isfinite(w)):
        raise argparse.ArgumentTypeError(f"{text!r}: the colours must differ and the weight must be finite and > 0")
    return obj, bg, w


def pair_weights(caps: list[str], boosts: list[tuple[str, str, float]]) -> list[float]:
    """Per clip, the cumulative weight of the clips up to it (for rng.choices' cum_weights), each clip
    weighing its object/background colour pair's boost, 1 where no boost names the pair."""
    table = {(o, b): w for o, b, w in boosts}
    if len(table) < len(boosts):
        raise SystemExit("--ar-boost names a colour pair twice")
    keys = [scenes.parse_caption(c) for c in caps]
    return list(itertools.accumulate(table.get((k.obj, k.bg), 1.0) for k in keys))


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def phase_dit(args, work: Path, stage: str = "dit") -> None:
    """stage "dit": the transformer and text encoder from scratch (phase dit). Stages "dir", "opp" and "ar"
    continue the stage before them (dit, dir, opp; ar from --ar-from's directory instead when given) with a
    fresh optimiser and learning-rate schedule: "dir" and "opp" on ambiguous inputs from the start (class
    Ambiguity; in "opp" the other motion is the opposite one), "ar" on render windows with held frames.
    Each writes its checkpoint <stage>_ckpt.pt and losses <stage>_losses.json."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    data = torch.load(work / "latents.pt")
    lat, caps = data["latents"], data["captions"]
    n, _, tlen, _, _ = lat.shape
    tok = load_tokenizer(work / "tokenizer")
    ckpt_path = work / f"{stage}_ckpt.pt"
    # steps, minutes, peak lr, 21-frame crop share, mix start, opposite share, the stage whose weights it
    # continues, seed offset
    max_steps, minutes, peak_lr, full_prob, mix_start, opposite, source, seed_offset = {
        "dit": (args.dit_steps, args.dit_minutes, args.dit_lr, args.dit_full_prob, args.dit_mix_start,
                args.dit_mix_opposite, None, 5),
        "dir": (args.dir_steps, args.dir_minutes, args.dir_lr, args.dir_full_prob, 0.0, args.dit_mix_opposite,
                "dit", 9),
        "opp": (args.opp_steps, args.opp_minutes, args.opp_lr, args.dir_full_prob, 0.0, 1.0, "dir", 11),
        "ar": (args.ar_steps, args.ar_minutes, args.ar_lr, 1.0, 0.0, 1.0, "opp", 13)}[stage]
    torch.manual_seed(args.seed + 4)
    dit = WanTransformer3DModel(**DIT_CFG)
    te = UMT5EncoderModel.from_pretrained(str(work / "text_encoder_init"), torch_dtype=torch.float32)
    ema = WanTransformer3DModel(**DIT_CFG)
    ema.load_state_dict(dit.state_dict())
    ema_te = UMT5EncoderModel.from_pretrained(str(work / "text_encoder_init"), torch_dtype=torch.float32)
    for m in (ema, ema_te):
        m.requires_grad_(False)
    cross = CompactCrossAttn()
    for blk in dit.blocks:
        blk.attn2.set_processor(cross)
    ambiguity = Ambiguity(lat, caps)
    # --ar-boost: in phase ar, clips of the named object/background colour pairs are drawn that many times
    # as often; without it the clips are drawn uniformly, with the same draws as runs made before the option.
    boost = pair_weights(caps, args.ar_boost) if stage == "ar" and args.ar_boost else None
    params = list(dit.parameters()) + list(te.parameters())
    # With --dir-text-lr M in phases dir and opp, the text path (the text encoder and the transformer's
    # cross-attention) learns at M times the peak learning rate, in a second parameter group; otherwise one
    # group, as in checkpoints written before the option.
    text_mult = args.dir_text_lr if stage in ("dir", "opp") else 1.0
    if text_mult != 1.0:
        text_ids = {id(p) for p in te.parameters()} | {id(p) for blk in dit.blocks for p in blk.attn2.parameters()}
        groups = [dict(params=[p for p in params if id(p) not in text_ids], mult=1.0),
                  dict(params=[p for p in params if id(p) in text_ids], mult=text_mult)]
    else:
        groups = [dict(params=params, mult=1.0)]
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.99), weight_decay=0.01)
    seed = args.seed + seed_offset
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    step, hist, spent, count = 0, [], 0.0, max_steps
    if not (ckpt_path.exists() and args.resume):
        ck, origin = None, None
        if stage == "ar" and args.ar_from:
            # An exported model directory instead of phase opp's checkpoint (its weights are EMA weights).
            d = WanTransformer3DModel.from_pretrained(str(Path(args.ar_from) / "transformer")).state_dict()
            t = UMT5EncoderModel.from_pretrained(str(Path(args.ar_from) / "text_encoder")).state_dict()
            ck, origin = dict(ema=d, ema_te=t), f"the model directory {args.ar_from}"
        elif source:
            ck = torch.load(work / f"{source}_ckpt.pt")
            origin = f"phase {source}'s weights (step {ck['step']})"
        if ck:
            # Phase ar continues the EMA weights (the ones exported), as from a model directory.
            keys = ("ema", "ema_te", "ema", "ema_te") if stage == "ar" else ("dit", "te", "ema", "ema_te")
            for m, key in zip((dit, te, ema, ema_te), keys):
                m.load_state_dict(ck[key])
            log(f"{stage}: from {origin}")
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
        # The step count as the phase's clock had shortened it (class Clock), when the checkpoint records it
        # and the planned count is unchanged.
        if ck.get("planned") == max_steps:
            count = ck["count"]
        log(f"{stage}: resumed at step {step}")
    log(f"{stage}: {sum(p.numel() for p in dit.parameters()) / 1e6:.3f} M params, {n} latent clips of {tlen} frames")
    clock = Clock(stage, count, minutes, spent)
    t0 = clock.t0
    acc, acc_b, acc_c = [], [], []
    ema_pairs = list(zip(list(ema.parameters()) + list(ema_te.parameters()), params))

    def save_ckpt():
        torch.save(dict(dit=dit.state_dict(), te=te.state_dict(), ema=ema.state_dict(), ema_te=ema_te.state_dict(),
                        opt=opt.state_dict(), gen=gen.get_state(), rng=rng.getstate(), step=step, hist=hist,
                        spent=time.time() - t0, count=clock.steps, planned=max_steps), ckpt_path)

    while step < max_steps:
        progress = clock.progress(step)
        if progress >= 1:
            break
        lr = lr_at(progress, peak_lr, 0.04)
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"]
        # A crop of the cached 41-frame latent sequences: the render window's 21 frames with probability
        # --dit-full-prob (--dir-full-prob in phases dir and opp), else --dit-short frames; the batch holds
        # about --dit-batch x 21 latent frames either way. It starts at latent frame 0 (the video's
        # single-frame first latent, as in a render's first window) with probability 0.3, else at a random
        # offset.
        win = WINDOW if rng.random() < full_prob else args.dit_short
        bsz = max(1, round(args.dit_batch * WINDOW / win))
        idx = rng.choices(range(n), cum_weights=boost, k=bsz) if boost else [rng.randrange(n) for _ in range(bsz)]
        starts = [0 if rng.random() < 0.3 else rng.randrange(tlen - win + 1) for _ in idx]
        x0 = torch.stack([lat[i, :, s:s + win] for i, s in zip(idx, starts)])
        prompts = ["" if rng.random() < args.text_dropout else caps[i] for i in idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(len(idx), gen)
        x_in = x0
        plain = [True] * len(idx)
        mix_frac = args.ar_mix_frac if stage == "ar" else args.dit_mix_frac
        if progress >= mix_start and mix_frac > 0:
            # Ambiguous inputs (class Ambiguity) for a share of the captioned items.
            x_in = x0.clone()
            twins = []
            for k, (i, s) in enumerate(zip(idx, starts)):
                if prompts[k] and rng.random() < mix_frac:
                    x_in[k], other, j = ambiguity.blend(rng, i, s, win, args.dit_mix_weight, opposite)
                    sigma[k] = rng.uniform(*args.dit_mix_sigma)
                    plain[k] = False
                    if stage in ("dir", "opp") and args.dir_twins > 0 and rng.random() < args.dir_twins:
                        twins.append((k, other, caps[j]))
            if twins:
                # Twins (--dir-twins): the same noisy blend once more with the other clip's caption and the
                # velocity towards the other clip, so the batch holds both readings of one input.
                ks = [k for k, _, _ in twins]
                x_in = torch.cat([x_in, x_in[ks]])
                x0 = torch.cat([x0, torch.stack([o for _, o, _ in twins])])
                noise = torch.cat([noise, noise[ks]])
                sigma = torch.cat([sigma, sigma[ks]])
                prompts = prompts + [c for _, _, c in twins]
                plain = plain + [False] * len(twins)
        held = []
        if stage == "ar":
            # Hand-overs: a share of the plain crops (not starting at frame 0) get their first --ar-hold latent
            # frames replaced by the model's own one-step prediction of them from noise level --ar-ctx-sigma,
            # as an autoregressive window holds the previous window's result; the loss is on the other frames.
            held = [k for k in range(len(idx)) if plain[k] and starts[k] > 0 and rng.random() < args.ar_ctx_frac]
            # Of those, a share --ar-ctx-widen holds the clip's own frames widened instead (widen_held); at 0 no
            # draw is made, so runs without it repeat those made before the option.
            widened = [k for k in held if rng.random() < args.ar_ctx_widen] if args.ar_ctx_widen > 0 else []
            predicted = [k for k in held if k not in widened]
            x_in = x0.clone() if x_in is x0 and held else x_in
            if predicted:
                with torch.no_grad():
                    sub = x0[predicted]
                    sp = torch.tensor([rng.uniform(*args.ar_ctx_sigma) for _ in predicted]).view(-1, 1, 1, 1, 1)
                    xp = (1 - sp) * sub + sp * torch.randn(sub.shape, generator=gen)
                    ctx_p, cross.bias = encode_text_compact(tok, te, [caps[idx[k]] for k in predicted])
                    vp = dit(hidden_states=xp, timestep=sp.flatten() * 1000, encoder_hidden_states=ctx_p,
                             return_dict=False)[0]
                    pred = xp - sp * vp
                for j, k in enumerate(predicted):
                    x_in[k, :, :args.ar_hold] = pred[j, :, :args.ar_hold]
            for k in widened:
                x_in[k, :, :args.ar_hold] = widen_held(x0[k, :, :args.ar_hold], rng)
                # A share --ar-ctx-smear of them is also smeared along the object's motion (smear_held); at 0
                # no draw is made.
                if args.ar_ctx_smear > 0 and rng.random() < args.ar_ctx_smear:
                    x_in[k, :, :args.ar_hold] = smear_held(x_in[k, :, :args.ar_hold], caps[idx[k]], rng)
        n_flow, n_pair = len(prompts), 0
        if args.contrast_frac > 0 and stage in args.contrast_phases:
            # Colour pairs (see --contrast-frac): plain crops at high noise, each twice, once with its caption
            # and once with the object's colour word replaced.
            pairs = [(i, s) for i, s in zip(idx, starts) if rng.random() < args.contrast_frac]
            if pairs:
                px0 = torch.stack([lat[i, :, s:s + win] for i, s in pairs])
                pnoise = torch.randn(px0.shape, generator=gen)
                psig = torch.tensor([rng.uniform(*args.contrast_sigma) for _ in pairs])
                x_in = None if x_in is x0 else torch.cat([x_in, px0, px0])
                x0 = torch.cat([x0, px0, px0])
                x_in = x0 if x_in is None else x_in
                noise = torch.cat([noise, pnoise, pnoise])
                sigma = torch.cat([sigma, psig, psig])
                prompts = prompts + [caps[i] for i, _ in pairs] + [wrong_colour(rng, caps[i], args.contrast_nearest)
                                                                   for i, _ in pairs]
                n_pair = len(pairs)
        s5 = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s5) * x_in + s5 * noise
        if held and args.ar_hold_noise != 1.0:
            # The held frames at --ar-hold-noise times the step's noise level, as longtake's --hold-noise
            # re-noises them.
            hs, h = s5[held] * args.ar_hold_noise, args.ar_hold
            xt[held, :, :h] = (1 - hs) * x_in[held, :, :h] + hs * noise[held, :, :h]
        # The velocity that takes x_t to the captioned clip: noise - x0 where the input is the clip itself (the
        # held frames of hand-over crops are left out of the loss), (x_t - x0) / sigma for the blends.
        target = noise - x0
        blends = [k for k, p in enumerate(plain) if not p]
        if blends:
            target[blends] = (xt[blends] - x0[blends]) / s5[blends]
        ctx, cross.bias = encode_text_compact(tok, te, prompts)
        v = dit(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
        err_all = (v - target).pow(2)
        # [the step's crops, the colour pairs' true copies, their wrong copies]; the true copies join the flow
        # loss with --contrast-flow.
        if args.contrast_flow:
            n_flow += n_pair
        err = err_all[:n_flow]
        # Per latent cell [B, 1, T, H, W]: 0 on the held frames of hand-over crops (phase ar), else 1.
        free = torch.ones_like(err[:, :1])
        free[held, :, :args.ar_hold] = 0
        loss = (err * free).sum() / (free.sum() * err.shape[1])
        # The object covers about a seventh of a frame and the background is learnt first, so latent cells
        # that differ from their frame's background (per-channel spatial median) weigh up to
        # 1 + --dit-obj-weight; the loss logged is the plain flow loss.
        with torch.no_grad():
            # x0 [B, C, T, H, W] -> per cell [B, 1, T, H, W]
            obj_all = (background_distance(x0.transpose(1, 2)).unsqueeze(1) / OBJ_DEV).clamp(max=1.0)
            obj = obj_all[:n_flow]
            weight = (1 + args.dit_obj_weight * obj) * free
            weight = weight / weight.mean()
        train_loss = (err * weight).mean()
        if n_pair:
            # Hinge on the object cells' error: the wrong colour word must cost at least --contrast-margin
            # more than the true one (relative), else both predictions are pushed apart.
            w_obj = obj_all[-n_pair:]
            area = w_obj.sum((1, 2, 3, 4)).clamp(min=1e-6)
            e_true = (err_all[-2 * n_pair:-n_pair] * w_obj).sum((1, 2, 3, 4)) / area
            e_wrong = (err_all[-n_pair:] * w_obj).sum((1, 2, 3, 4)) / area
            hinge = torch.relu((1 + args.contrast_margin) * e_true - e_wrong) / e_true.detach().clamp(min=1e-6)
            train_loss = train_loss + args.contrast_weight * hinge.mean()
            acc_c.append(float((e_wrong / e_true).mean().detach()))
        opt.zero_grad(set_to_none=True)
        train_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in ema_pairs:
                pe.lerp_(p.detach(), 1 - decay)
        acc.append(loss.item())
        if blends:
            acc_b.append(float(err[blends].mean().detach()))
        if step % 25 == 0:
            hist.append(dict(step=step, minutes=round((time.time() - t0) / 60, 2), loss=float(np.mean(acc)),
                             lr=lr))
            acc = []
            if acc_b:
                # The flow loss on the ambiguous inputs alone: it drops once the text decides the motion.
                hist[-1]["blend_loss"] = float(np.mean(acc_b))
                acc_b = []
            if acc_c:
                hist[-1]["wrong_colour_ratio"] = float(np.mean(acc_c))
                acc_c = []
            log(f"{stage} step {step} ({hist[-1]['minutes']} min): flow loss {hist[-1]['loss']:.4f} lr {lr:.2e}"
                + (f", blends {hist[-1]['blend_loss']:.4f}" if "blend_loss" in hist[-1] else "")
                + (f", wrong/true colour {hist[-1]['wrong_colour_ratio']:.2f}" if "wrong_colour_ratio" in hist[-1] else ""))
        if step % args.ckpt_every == 0:
            save_ckpt()
        if step % args.export_every == 0:
            export(args, work, ema, ema_te, dit_step=step)
    save_ckpt()
    (work / f"{stage}_losses.json").write_text(json.dumps(dict(steps=step, minutes=(time.time() - t0) / 60,
                                                               history=hist), indent=1))
    log(f"{stage} done: {step} steps in {(time.time() - t0) / 60:.1f} min")
    if stage != "dit":
        export(args, work, ema, ema_te, dit_step=step)


def trained_transformer(work: Path):
    """The EMA transformer and text encoder of the most recently trained of phases dit, dir, opp and ar (each
    continues the one before), and its step."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    ckpts = [work / f"{st}_ckpt.pt" for st in ("dit", "dir", "opp", "ar") if (work / f"{st}_ckpt.pt").exists()]
    ck = torch.load(max(ckpts, key=lambda f: f.stat().st_mtime))
    dit = WanTransformer3DModel(**DIT_CFG)
    dit.load_state_dict(ck["ema"])
    te = UMT5EncoderModel.from_pretrained(str(work / "text_encoder_init"), torch_dtype=torch.float32)
    te.load_state_dict(ck["ema_te"])
    return dit, te, ck["step"]


def export(args, work: Path, dit=None, te=None, dit_step=None) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5EncoderModel

    if dit is None:
        dit, te, dit_step = trained_transformer(work)
    data = torch.load(work / "latents.pt")
    vae_dir = next(work / d for d in VAE_STAGES if (work / d).exists())
    vae = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=torch.float32)
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
    # Files of the model directory that are not the pipeline's.
    for keep in ("README.md", "MEASUREMENTS.md", "longtake.json"):
        if (out / keep).exists():
            shutil.copyfile(out / keep, tmp / keep)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"exported to {out} (DiT step {dit_step}, VAE {vae_dir.name}, {size / 1e6:.1f} MB)")


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
                    all_ok=float(np.mean([min(r["bg_frac"], r["obj_frac"]) >= COLOUR_BAR and r["motion_ok"]
                                          and r["shape_ok"] for r in rs])))
    s = dict(steps=args.eval_steps, guidance=args.eval_guidance, frames=args.eval_frames,
             seconds_per_video=float(np.median(times)),
             held_out=summary([r for r in results if r["held_out"]]),
             train=summary([r for r in results if not r["held_out"]]), results=results)
    (work / f"eval_s{args.eval_steps}_g{args.eval_guidance:g}.json").write_text(json.dumps(s, indent=1))
    log(f"eval summary: held-out {s['held_out']}; train {s['train']}; {s['seconds_per_video']:.1f} s/video")


LONG_CAPTIONS = [
    "a yellow square moves right on a green background",  # the example prompt (training set)
    "a red circle moves left on a blue background",  # held-out tuple
    "a blue square moves down on a yellow background",  # held-out tuple
    "a black square moves right on a white background",  # held-out tuple
    "a white circle moves up on a red background",  # training
    "a green square stays still on a black background",  # training
]


def boundary_jumps(frames: np.ndarray, starts: list[int], length: int, a: dict) -> dict:
    """Frame-to-frame change of a long video at the co-denoising windows' seams versus inside the windows.
    A step (pixel frame i -> i+1) is a seam step when either frame belongs to a latent frame covered by two
    windows (the overlaps, where the blend weights ramp) or to the first latent frame after a window's end;
    the others are inside one window. Measured as the mean absolute pixel change (RGB in [0, 1]) and as the
    object centroid's wrapped displacement in px (steps with no object found are skipped)."""
    t_lat = max(s + length for s in starts)
    cover = np.zeros(t_lat, int)
    for s in starts:
        cover[s:s + length] += 1
    seam_lat = set(np.nonzero(cover > 1)[0].tolist())
    for s in starts:
        if s + length < t_lat:
            seam_lat.add(s + length)
    lat_of = lambda i: 0 if i == 0 else (i + 3) // 4  # latent frame of pixel frame i
    n = len(frames)
    pix = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    h, w = frames.shape[1:3]
    cx, cy = np.array(a["cx"]), np.array(a["cy"])
    dc = np.hypot((np.diff(cx) + w / 2) % w - w / 2, (np.diff(cy) + h / 2) % h - h / 2)
    seam = np.array([lat_of(i) in seam_lat or lat_of(i + 1) in seam_lat for i in range(n - 1)])

    def mx(v, m):
        v = v[m]
        v = v[~np.isnan(v)]
        return float(v.max()) if len(v) else float("nan")

    return dict(pix_max_seam=mx(pix, seam), pix_max_inside=mx(pix, ~seam), centroid_max_seam=mx(dc, seam),
                centroid_max_inside=mx(dc, ~seam), seam_steps=int(seam.sum()), inside_steps=int((~seam).sum()))


@torch.no_grad()
def phase_long(args, work: Path) -> None:
    """Long videos as longtake renders them: 21-frame windows joined by the reference loops of
    tools/reference_codenoise.py with the stitching and overlap of the model's longtake.json (else co-denoising,
    overlap 4), then one VAE decode; scored whole and per 81 frames, and checked for jumps at the windows'
    seams (boundary_jumps)."""
    from diffusers import WanPipeline
    from PIL import Image
    from reference_codenoise import autoregressive, codenoise, independent, window_plan

    pipe = WanPipeline.from_pretrained(args.out, torch_dtype=torch.float32)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    stitching, overlap = args.render["stitching"], args.render["overlap"]
    log(f"long: {stitching} stitching, overlap {overlap}")
    out = []
    for k, cap in enumerate(LONG_CAPTIONS[:args.long_captions]):
        scene = scenes.parse_caption(cap)
        t_lat = (args.long_frames - 1) // 4 + 1
        noise = torch.randn(1, 16, t_lat, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(args.seed + 200 + k))
        run = dict(prompt=cap, negative_prompt="", guidance_scale=args.eval_guidance,
                   num_inference_steps=args.eval_steps, window=WINDOW, overlap=overlap,
                   hold_release=args.render.get("hold_release", 0.0))
        t = time.time()
        if stitching == "codenoise":
            res = codenoise(pipe, run, noise)
        else:
            starts, length, _ = window_plan(t_lat, WINDOW, overlap)
            loop = {"independent": independent, "autoregressive": autoregressive}[stitching]
            res = dict(latents=loop(pipe, run, noise), starts=starts, length=length)
        t_dit = time.time() - t
        video = vae.decode(res["latents"] / inv_std + mean).sample
        t_all = time.time() - t
        frames = from_pixels(video)
        whole = scenes.score(scene, frames)
        jumps = boundary_jumps(frames, res["starts"], res["length"], scenes.analyze_frames(frames))
        chunks = [scenes.score(scene, frames[i:i + 81]) for i in range(0, len(frames) - 80, 80)]
        r = dict(caption=cap, held_out=scenes.is_held_out(scene), frames=len(frames), windows=len(res["starts"]),
                 seconds_denoise=t_dit, seconds_total=t_all, whole=whole, jumps=jumps,
                 chunks_motion_ok=float(np.mean([c["motion_ok"] for c in chunks])),
                 chunks_bg=float(np.mean([c["bg_frac"] for c in chunks])),
                 chunks_obj=float(np.mean([c["obj_frac"] for c in chunks])))
        out.append(r)
        u8 = (frames * 255).round().astype(np.uint8)
        Image.fromarray(np.concatenate(list(u8[::40]), axis=1)).save(work / f"long_{k}.png")
        log(f"long {k}: {cap}: {len(frames)} frames, {len(res['starts'])} windows, {t_dit:.0f}s denoise, "
            f"{t_all:.0f}s total; whole {whole}; jumps {jumps}; per-81-frame chunks: motion ok "
            f"{r['chunks_motion_ok']:.2f}, bg {r['chunks_bg']:.2f}, obj {r['chunks_obj']:.2f}")
    (work / f"long_s{args.eval_steps}_g{args.eval_guidance:g}.json").write_text(json.dumps(out, indent=1))


TRANSFORMER_PHASES = ("dit", "dir", "opp", "ar")


def fit_budget(args, phase: str, ahead: list[str], left: float) -> None:
    """Shrinks transformer phase `phase`'s wall-time budget (--<phase>-minutes) so that it and the
    transformer phases after it in `ahead`, each keeping its share, fit in the `left` minutes of
    --total-minutes less what phases vae5 and export ahead need. A phase is never cut below a quarter
    of its budget; a run that slow overruns --total-minutes, and says so."""
    later = [p for p in ahead if p in TRANSFORMER_PHASES]
    reserve = (args.vae5_minutes + 0.5 if "vae5" in ahead else 0.0) + (0.2 if "export" in ahead else 0.0)
    planned = sum(getattr(args, f"{p}_minutes") for p in later)
    scale = max(0.0, left - reserve) / planned
    if scale >= 1:
        return
    own = getattr(args, f"{phase}_minutes")
    cut = own * max(scale, 0.25)
    log(f"{phase}: wall-time budget {own:.1f} -> {cut:.1f} min, to end the run within --total-minutes "
        f"{args.total_minutes:g} ({left:.1f} min left for {' '.join(later)}, {reserve:.1f} reserved for the rest)"
        + ("; the run will overrun it" if scale < 0.25 else ""))
    setattr(args, f"{phase}_minutes", cut)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "model" / "assets" / "demo-model"))
    ap.add_argument("--work", default=str(REPO / "target" / "demo-train"))
    ap.add_argument("--phase", nargs="*",
                    default=["text", "vae", "latents", "vae3", "vae4", "dit", "dir", "opp", "vae5", "ar", "export", "eval",
                             "long"],
                    choices=["text", "vae", "vae2", "latents", "vae3", "vae4", "vae5", "dit", "dir", "opp", "ar", "export", "eval", "long"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--total-minutes", type=float, default=88,
                    help="the transformer phases (dit, dir, opp, ar) shrink their wall-time budgets, each in "
                         "proportion, so that the phases up to export end within this many minutes of the "
                         "start; a machine fast enough never needs it (0: no run-wide budget)")
    ap.add_argument("--vae-steps", type=int, default=1086)
    ap.add_argument("--vae-minutes", type=float, default=21)
    ap.add_argument("--vae-batch", type=int, default=4)
    ap.add_argument("--vae-frames", type=int, default=9, help="vae: graded pixel frames per clip from frame 0 (1 + 4k)")
    ap.add_argument("--vae-warm-prob", type=share, default=0.4,
                    help="vae: probability that the graded frames follow a gradient-free warm-up prefix")
    ap.add_argument("--vae-warm-start", type=float, default=0.2, help="vae: fraction of the phase before such steps")
    ap.add_argument("--vae-warm-max", type=int, default=24, help="vae: longest warm-up prefix, in latent frames")
    ap.add_argument("--vae-warm-batch", type=int, default=2, help="vae: clips per warm-up step")
    ap.add_argument("--vae-warm-frames", type=int, default=8, help="vae: graded frames after the prefix (4k)")
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae2-steps", type=int, default=1000)
    ap.add_argument("--vae2-minutes", type=float, default=10)
    ap.add_argument("--vae2-batch", type=int, default=1)
    ap.add_argument("--vae2-frames", type=int, default=81)
    ap.add_argument("--vae2-lr", type=float, default=5e-4)
    ap.add_argument("--vae3-steps", type=int, default=506)
    ap.add_argument("--vae3-minutes", type=float, default=8)
    ap.add_argument("--vae3-lr", type=float, default=5e-4)
    ap.add_argument("--vae3-noise", type=float, default=0.1)
    ap.add_argument("--vae3-obj-weight", type=float, default=4.0, help="vae3, vae4: loss weight of object pixels")
    ap.add_argument("--vae4-from", default="vae3", choices=["vae3", "vae"],
                    help="vae4: the decoder it continues (phase vae3's, or phase vae's when vae3 is left out)")
    ap.add_argument("--vae4-steps", type=int, default=300, help="vae4: step count")
    ap.add_argument("--vae4-minutes", type=float, default=5.5, help="vae4: wall-time budget")
    ap.add_argument("--vae4-lr", type=float, default=5e-4, help="vae4: peak learning rate")
    ap.add_argument("--vae4-noise", type=float, default=0.5, help="vae4: latent noise, times the latents' std")
    ap.add_argument("--vae5-steps", type=int, default=200, help="vae5: step count")
    ap.add_argument("--vae5-minutes", type=float, default=4.6, help="vae5: wall-time budget")
    ap.add_argument("--vae5-lr", type=float, default=5e-4, help="vae5: peak learning rate")
    ap.add_argument("--vae5-batch", type=int, default=2, help="vae5: clips per step")
    ap.add_argument("--vae5-frames", type=int, default=33, help="vae5: pixel frames per clip, from frame 0 (1 + 4k)")
    ap.add_argument("--vae5-sigma-max", type=float, default=0.8,
                    help="vae5: highest noise level of the transformer's inputs")
    ap.add_argument("--vae5-guidance", type=float, default=1.0,
                    help="vae5: classifier-free guidance of the transformer's predictions (1: the captioned one alone)")
    ap.add_argument("--vae-kl", type=float, default=1e-4)
    ap.add_argument("--vae-anchor", type=float, default=1.0)
    ap.add_argument("--clips-per-scene", type=int, default=2)
    ap.add_argument("--latent-frames", type=int, default=161)
    ap.add_argument("--recon-checks", type=int, default=8, help="held-out clips reconstructed to check the VAE")
    ap.add_argument("--latent-scenes", type=int, default=0, help="encode only the first N clips (quick tests)")
    ap.add_argument("--dit-steps", type=int, default=2950)
    ap.add_argument("--dit-minutes", type=float, default=19)
    ap.add_argument("--dit-batch", type=int, default=8, help="dit: clips per batch of 21-frame crops")
    ap.add_argument("--dit-full-prob", type=share, default=0.5, help="dit: probability of a 21-frame crop")
    ap.add_argument("--dit-short", type=int, default=9, help="dit: latent frames of the other crops")
    ap.add_argument("--dit-lr", type=float, default=1e-3)
    ap.add_argument("--dit-obj-weight", type=float, default=3.0,
                    help="dit: extra loss weight of latent cells that differ from the frame's background")
    ap.add_argument("--dit-mix-start", type=float, default=1.0,
                    help="dit: fraction of the phase after which ambiguous inputs are mixed in (class Ambiguity); "
                         "1 = never (phase dir mixes them in from its start)")
    ap.add_argument("--dit-mix-frac", type=share, default=0.8,
                    help="dit, dir: share of captioned items made ambiguous")
    ap.add_argument("--dit-mix-weight", type=float, nargs=2, default=(0.3, 0.7),
                    help="dit, dir: range of the captioned clip's weight in an ambiguous input")
    ap.add_argument("--dit-mix-sigma", type=float, nargs=2, default=(0.5, 0.97),
                    help="dit, dir: range of the noise level of ambiguous inputs")
    ap.add_argument("--dit-mix-opposite", type=share, default=0.0,
                    help="dit, dir: probability that an ambiguous input's other clip moves the opposite way")
    ap.add_argument("--dir-minutes", type=float, default=13.5, help="dir: wall-time budget")
    ap.add_argument("--dir-lr", type=float, default=1e-3, help="dir: peak learning rate")
    ap.add_argument("--dir-full-prob", type=share, default=0.0,
                    help="dir, opp: probability of a 21-frame crop (else --dit-short frames)")
    ap.add_argument("--dir-steps", type=int, default=1650, help="dir: step count")
    ap.add_argument("--dir-twins", type=share, default=0.5,
                    help="dir, opp: share of ambiguous inputs that also go in with the other clip's caption and "
                         "target (the batch grows by that many items)")
    ap.add_argument("--dir-text-lr", type=float, default=1.0,
                    help="dir, opp: learning rate of the text encoder and cross-attention, times the phase's")
    ap.add_argument("--opp-steps", type=int, default=1150, help="opp: step count")
    ap.add_argument("--opp-minutes", type=float, default=9.5, help="opp: wall-time budget")
    ap.add_argument("--opp-lr", type=float, default=5e-4, help="opp: peak learning rate")
    ap.add_argument("--ar-steps", type=int, default=600, help="ar: step count")
    ap.add_argument("--ar-minutes", type=float, default=6, help="ar: wall-time budget")
    ap.add_argument("--ar-lr", type=float, default=2e-4, help="ar: peak learning rate")
    ap.add_argument("--ar-mix-frac", type=share, default=0.3, help="ar: share of captioned items made ambiguous")
    ap.add_argument("--ar-ctx-frac", type=share, default=0.6,
                    help="ar: share of the other crops whose held frames are the model's own prediction")
    ap.add_argument("--ar-ctx-sigma", type=float, nargs=2, default=(0.2, 0.7),
                    help="ar: noise-level range of the held frames' one-step prediction")
    ap.add_argument("--ar-from", help="ar: start from this exported model directory's transformer and text "
                                      "encoder instead of phase opp's checkpoint")
    ap.add_argument("--ar-boost", type=parse_boost, nargs="*", default=[], metavar="OBJECT:BACKGROUND=WEIGHT",
                    help="ar: draw clips of these object/background colour pairs WEIGHT times as often "
                         "(e.g. white:red=4)")
    ap.add_argument("--ar-hold", type=int, default=8, help="ar: held latent frames (the render's overlap)")
    ap.add_argument("--ar-ctx-widen", type=share, default=0.7,
                    help="ar: share of the held crops whose held frames are the clip's own, widened (widen_held) "
                         "instead of the model's prediction")
    ap.add_argument("--ar-ctx-smear", type=share, default=0.0,
                    help="ar: share of the widened held crops also smeared along the object's motion (smear_held)")
    ap.add_argument("--ar-hold-noise", type=float, default=0.7,
                    help="ar: the held frames' noise level as a multiple of the step's (longtake's --hold-noise)")
    ap.add_argument("--contrast-frac", type=share, default=0.2,
                    help="share of a step's items that also go in as a colour pair: a plain crop at noise "
                         "--contrast-sigma with its caption and with another object colour")
    ap.add_argument("--contrast-sigma", type=float, nargs=2, default=(0.6, 1.0),
                    help="noise-level range of the colour pairs")
    ap.add_argument("--contrast-margin", type=float, default=0.5,
                    help="how much more object-cell loss (relative) the wrong colour word must cost")
    ap.add_argument("--contrast-weight", type=float, default=1.0, help="weight of the colour pairs' hinge")
    ap.add_argument("--contrast-nearest", type=share, default=0.0,
                    help="share of the colour pairs whose wrong word is the colour nearest the object's in RGB "
                         "instead of any other (0: any, as before the option)")
    ap.add_argument("--contrast-flow", action=argparse.BooleanOptionalAction, default=True,
                    help="the colour pairs' true copies also join the flow loss (else only the hinge)")
    ap.add_argument("--contrast-phases", nargs="+", default=["ar"], choices=["dit", "dir", "opp", "ar"],
                    help="transformer phases that train on colour pairs")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--text-dropout", type=share, default=0.1)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--export-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true", help="dit: continue from the work directory's checkpoint")
    ap.add_argument("--eval-steps", type=int, help="eval, long: sampler steps (default: --out's longtake.json)")
    ap.add_argument("--eval-guidance", type=float, help="eval, long: guidance (default: --out's longtake.json)")
    ap.add_argument("--eval-frames", type=int, default=81)
    ap.add_argument("--long-frames", type=int, default=961, help="long: frames of the co-denoised video")
    ap.add_argument("--long-captions", type=int, default=len(LONG_CAPTIONS), help="long: how many of LONG_CAPTIONS")
    ap.add_argument("--eval-train", type=int, default=10, help="training captions evaluated besides the held-out")
    args = ap.parse_args()
    declared = Path(args.out) / "longtake.json"
    args.render = {**RENDER_FALLBACK, **(json.loads(declared.read_text()) if declared.exists() else {})}
    args.eval_steps = args.eval_steps or args.render["steps"]
    args.eval_guidance = args.eval_guidance if args.eval_guidance is not None else args.render["guidance"]

    torch.set_num_threads(args.threads)
    import diffusers
    import transformers
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}; "
        f"threads {args.threads}; phases {args.phase}; work {args.work}; out {args.out}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps(vars(args), indent=1))
    t0 = time.time()
    for i, ph in enumerate(args.phase):
        tp = time.time()
        if args.total_minutes > 0 and ph in TRANSFORMER_PHASES:
            fit_budget(args, ph, args.phase[i:], args.total_minutes - (tp - t0) / 60)
        {"text": phase_text, "vae": phase_vae, "vae2": lambda a, w: phase_vae(a, w, stage=2), "vae3": phase_vae3,
         "vae4": lambda a, w: phase_vae3(a, w, stage="vae4"), "vae5": phase_vae5, "latents": phase_latents, "dit": phase_dit,
         "dir": lambda a, w: phase_dit(a, w, stage="dir"),
         "opp": lambda a, w: phase_dit(a, w, stage="opp"),
         "ar": lambda a, w: phase_dit(a, w, stage="ar"),
         "export": lambda a, w: export(a, w), "eval": phase_eval, "long": phase_long}[ph](args, work)
        log(f"phase {ph}: {(time.time() - tp) / 60:.1f} min")
    log(f"total {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
