"""Pre-train the shapes world's Stable Diffusion 3 model (a flow-matching ``SD3Transformer2DModel``), from scratch,
reproducibly from a seed, on the latent space of the world's shipped autoencoder.

The same world as ``pretrain.py``, in the architecture of Stable Diffusion 3, so that PALP can be measured on flow
matching as well as on the epsilon-predicting UNet:

- the autoencoder is ``model/vae``, frozen (the UNet world's codec: what it keeps is what either model can draw); the
  exported config gets SD3's ``shift_factor`` and ``scaling_factor`` (``latent_normalization``);
- two small CLIP text encoders with projection, of different widths, in the places of SD3's CLIP-L and CLIP-G, both
  reading the world's tokenizer; the T5 encoder is absent (``text_encoder_3=None``), so its part of the prompt is the
  block of zeros ``StableDiffusion3Pipeline`` writes without it;
- a tiny ``SD3Transformer2DModel`` (MM-DiT joint blocks) trained jointly with both text encoders with rectified flow
  matching: x_σ = (1 − σ)·x0 + σ·ε, velocity target v = ε − x0, σ drawn as diffusers' SD3 DreamBooth script draws it
  (logit-normal by default), 10% empty captions so classifier-free guidance works (PALP's alignment term queries the
  empty prompt), and EMA weights exported.

Stages (``--stage``), each resumable from its last checkpoint in ``--output_dir``:

1. ``data``: the UNet world's pre-training scenes (``pretrain.render_dataset``: held-out combinations and the
   subjects' appearances never shown) and their latents under the frozen autoencoder.
2. ``transformer``: the transformer and both text encoders.
3. ``export``: the diffusers layout, loadable with ``StableDiffusion3Pipeline.from_pretrained``.

``--stage all`` (the default) runs them in order:

    python examples/shapes_world/pretrain_flow.py --output_dir runs/shapes_pretrain_flow \\
        --export_dir examples/shapes_world/model_flow

README.md ("A flow-matching world") lists the exact commands, wall times and losses of the shipped model.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pretrain
import torch
import world

HERE = Path(__file__).resolve().parent

# Each CLIP encoder's width is its share of the transformer's text features (SD3 concatenates CLIP-L's 768 and
# CLIP-G's 1280 channels); two different widths keep the pipeline's concatenation and zero padding honest.
CLIP_WIDTHS = (64, 96)
# Length of the absent T5 encoder's block of zeros in the prompt. StableDiffusion3Pipeline writes
# ``max_sequence_length`` (256 by default) zero tokens after the CLIP tokens; they stay identical to each other through
# the joint blocks, but their number sets the share of attention they take, so a model is tied to the length it was
# trained with. 256 zero tokens would cost this transformer (64 image tokens, 32 CLIP tokens) five times the compute
# for no information, so it is trained with none: sample with ``max_sequence_length=0``.
T5_SEQUENCE_LENGTH = 0


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Pre-train the shapes-world Stable Diffusion 3 (flow) model.")
    parser.add_argument("--output_dir", type=str, default="runs/shapes_pretrain_flow",
                        help="Where the rendered data, latents, checkpoints and the log go.")
    parser.add_argument("--export_dir", type=str, default=str(HERE / "model_flow"),
                        help="Where the final pipeline is written (diffusers layout).")
    parser.add_argument("--vae", type=str, default=str(HERE / "model" / "vae"),
                        help="The frozen autoencoder (the UNet world's shipped one).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for data, initialisation and training.")
    parser.add_argument("--num_images", type=int, default=16000,
                        help="Rendered training scenes (held-out attribute combinations excluded).")
    parser.add_argument("--max_train_steps", type=int, default=6000,
                        help="Transformer + text-encoder steps (training also stops at --max_train_minutes).")
    parser.add_argument("--max_train_minutes", type=float, default=1000.0,
                        help="Wall-clock budget of the transformer stage, so pre-training ends on time on a slow "
                        "machine.")
    parser.add_argument("--train_batch_size", type=int, default=32, help="Batch size.")
    parser.add_argument("--learning_rate", type=float, default=5e-4,
                        help="Transformer and text-encoder learning rate (ours: the UNet world's).")
    parser.add_argument("--lr_warmup_steps", type=int, default=200, help="Linear warm-up steps, then constant.")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the exported weights.")
    parser.add_argument("--caption_dropout", type=float, default=0.1,
                        help="Fraction of empty captions (classifier-free guidance).")
    parser.add_argument("--weighting_scheme", type=str, default="logit_normal",
                        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
                        help="How σ is drawn (diffusers' SD3 DreamBooth flag; SD3's paper found logit-normal best).")
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal σ density.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit-normal σ density.")
    parser.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the 'mode' σ density.")
    parser.add_argument("--shift", type=float, default=1.0,
                        help="FlowMatchEulerDiscreteScheduler shift, for training σ and for sampling (ours: 1.0, no "
                        "shift. SD3 shifts by 3.0 for 128×128 latents because a large image keeps its content under "
                        "noise that destroys a small one; the SD3 paper's own base resolution, 32×32 latents, uses 1, "
                        "and these latents are 8×8).")
    parser.add_argument("--checkpoint_minutes", type=float, default=3.0, help="Minutes between checkpoints.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--fp16_export", action=argparse.BooleanOptionalAction, default=True,
                        help="Store the transformer and autoencoder in float16 (loads as float32 by default).")
    parser.add_argument("--stage", type=str, default="all", choices=["all", "data", "transformer", "export"],
                        help="Run one stage only (each resumes from its checkpoint).")
    return parser.parse_args(input_args)


def build_transformer(latent_channels=pretrain.LATENT_CHANNELS, clip_widths=CLIP_WIDTHS):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        # Patch 1: each 8×8 latent cell (4×4 pixels) is a token, 64 in all; a 2×2 patch would leave 16 tokens of
        # 8×8 pixels for 3-pixel stripes and dots.
        patch_size=1,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=sum(clip_widths),
        caption_projection_dim=128,
        pooled_projection_dim=sum(clip_widths),
        pos_embed_max_size=8,
        # SD3.5's query/key RMSNorm: keeps attention logits bounded at this learning rate.
        qk_norm="rms_norm",
    )


def build_text_encoder(vocab_size, max_length, width):
    """A small CLIP text encoder with projection (SD3's CLIP-L and CLIP-G are two of these, of different widths)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=4 * width,
            projection_dim=width,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=max_length,
            layer_norm_eps=1e-5,
        )
    )


def build_text_encoders(tokenizer, widths=CLIP_WIDTHS):
    return [build_text_encoder(len(tokenizer), tokenizer.model_max_length, w) for w in widths]


def build_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def encode_prompt(text_encoders, input_ids, t5_length=T5_SEQUENCE_LENGTH):
    """Prompt embeddings exactly as ``StableDiffusion3Pipeline.encode_prompt`` builds them without T5: each CLIP's
    penultimate hidden states concatenated on the feature axis, followed by ``t5_length`` zero tokens; the pooled
    embedding is both projected text embeddings concatenated. ``input_ids``: the tokenizer's ids (B, L), shared by
    both encoders as in the pipeline, which tokenizes the same prompt with each tokenizer."""
    hidden, pooled = [], []
    for encoder in text_encoders:
        out = encoder(input_ids, output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2])
    hidden = torch.cat(hidden, dim=-1)
    zeros = hidden.new_zeros(hidden.shape[0], t5_length, hidden.shape[-1])
    return torch.cat([hidden, zeros], dim=1), torch.cat(pooled, dim=-1)


def sample_sigmas(scheduler, batch_size, weighting_scheme, logit_mean, logit_std, mode_scale, generator):
    """σ and the transformer's timestep for a batch, as diffusers' SD3 DreamBooth script draws them: u from the
    weighting scheme's density on [0, 1), an index ⌊u·N⌋ into the scheduler's N (shifted) training σ."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean, logit_std, mode_scale,
                                              generator=generator)
    indices = (u * scheduler.config.num_train_timesteps).long()
    return scheduler.sigmas[indices], scheduler.timesteps[indices]


def flow_matching_pair(x0, noise, sigmas):
    """Rectified flow: the point x_σ = (1 − σ)·x0 + σ·ε on the straight path from data to noise, and the velocity
    v = dx_σ/dσ = ε − x0 the transformer learns to predict."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0


def latent_normalization(latents):
    """SD3's VAE config: ``shift_factor`` = the latents' mean, ``scaling_factor`` = 1 / their std, so that
    (z − shift) · scale has mean 0 and std 1, the scale of the noise it is mixed with (global scalars over all
    channels and positions, as SD3's 0.0609 / 1.5305 were measured)."""
    return float(latents.mean()), float(1.0 / latents.std())


def load_vae(path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32)
    vae.requires_grad_(False)
    return vae.eval()


def caption_batch(scenes, indices, rng, caption_dropout):
    """Captions with ``caption_dropout`` of them empty and, as in ``pretrain.py``, the colour, pattern and
    background words each dropped from 20% (so "a star" alone is a prompt the model knows)."""
    return ["" if rng.random() < caption_dropout
            else world.caption(scenes[i], rng, p_drop_colour=0.2, p_drop_pattern=0.2, p_drop_background=0.2)
            for i in indices]


def tokenize(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def build_models(tokenizer):
    return build_transformer(), build_text_encoders(tokenizer)


def train_transformer(out, latents, scenes, tokenizer, args):
    """Stage 2: transformer + both text encoders, velocity objective, 10% empty captions; returns the EMA models."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    torch.manual_seed(args.seed + 2)
    ckpt = Path(out) / "transformer.pt"
    transformer, text_encoders = build_models(tokenizer)
    ema_transformer, ema_text_encoders = build_models(tokenizer)
    models, ema_models = [transformer, *text_encoders], [ema_transformer, *ema_text_encoders]
    for ema, model in zip(ema_models, models):
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.01)
    start, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt)
        for model, s in zip(models, state["models"]):
            model.load_state_dict(s)
        for ema, s in zip(ema_models, state["ema"]):
            ema.load_state_dict(s)
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
    scheduler = build_scheduler(args.shift)
    # Seeded by the start step, so a resumed run is as reproducible as an uninterrupted one.
    gen = torch.Generator().manual_seed(args.seed + 3 + start)
    rng = np.random.default_rng(args.seed + 4 + start)
    shift, scale = latents["shift_factor"], latents["scaling_factor"]
    ema_pairs = list(zip([p for m in ema_models for p in m.parameters()], params))
    t_start, last_save, running = time.time(), time.time(), None
    step = start

    def save():
        save_checkpoint(ckpt, models, ema_models, opt, step, elapsed + time.time() - t_start)

    while step < args.max_train_steps and elapsed + (time.time() - t_start) < args.max_train_minutes * 60:
        for group in opt.param_groups:
            group["lr"] = args.learning_rate * min(1.0, (step + 1) / args.lr_warmup_steps)
        idx = torch.randint(0, len(latents["mean"]), (args.train_batch_size,), generator=gen)
        # Latents are the posterior means (the autoencoder was trained to decode means), normalized as SD3's are.
        x0 = (latents["mean"][idx] - shift) * scale
        ids = tokenize(tokenizer, caption_batch(scenes, idx.tolist(), rng, args.caption_dropout))
        noise = torch.randn(x0.shape, generator=gen)
        sigmas, timesteps = sample_sigmas(scheduler, args.train_batch_size, args.weighting_scheme, args.logit_mean,
                                          args.logit_std, args.mode_scale, gen)
        xt, target = flow_matching_pair(x0, noise, sigmas)
        prompt_embeds, pooled = encode_prompt(text_encoders, ids)
        pred = transformer(hidden_states=xt, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas).view(-1, 1, 1, 1)
        loss = (weighting * (pred - target) ** 2).mean()
        pretrain.optimizer_step_with_ema(loss, opt, params, ema_pairs, step, args.ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        step += 1
        if step % 50 == 0:
            pretrain.log(out, f"transformer step {step} loss {loss.item():.4f} avg {running:.4f} "
                              f"elapsed {(elapsed + time.time() - t_start) / 60:.1f} min")
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save()
            last_save = time.time()
    save()
    pretrain.log(out, f"transformer done at step {step}, final avg loss {running}")
    return ema_models


def save_checkpoint(path, models, ema_models, opt, step, elapsed):
    tmp = str(path) + ".tmp"
    torch.save({"models": [m.state_dict() for m in models], "ema": [m.state_dict() for m in ema_models],
                "opt": opt.state_dict(), "step": step, "elapsed": elapsed}, tmp)
    os.replace(tmp, path)


def prepare_latents(out, vae_path, num_images, seed):
    """Stage 1: the UNet world's scenes (same seed, same set) encoded by the frozen autoencoder, with SD3's
    normalization constants measured on them."""
    images, scenes = pretrain.render_dataset(out, num_images, seed)
    latents = pretrain.encode_dataset(out, load_vae(vae_path), images)
    latents["shift_factor"], latents["scaling_factor"] = latent_normalization(latents["mean"])
    return latents, scenes


def export_pipeline(export_dir, vae, transformer, text_encoders, tokenizer, latents, shift, fp16):
    """Write the diffusers folder that ``StableDiffusion3Pipeline.from_pretrained`` loads (no T5)."""
    from diffusers import StableDiffusion3Pipeline

    vae.register_to_config(shift_factor=latents["shift_factor"], scaling_factor=latents["scaling_factor"])
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=build_scheduler(shift), vae=vae,
        text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    if fp16:
        # diffusers loads float16 weights back as float32; transformers 5 would keep them float16, so the (tiny)
        # text encoders stay float32.
        pipe.transformer.to(torch.float16)
        pipe.vae.to(torch.float16)
    pipe.save_pretrained(export_dir, safe_serialization=True)
    return pipe


def main(args):
    torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    latents, scenes = prepare_latents(out, args.vae, args.num_images, args.seed)
    pretrain.log(out, f"data: {len(scenes)} scenes, latents shift_factor {latents['shift_factor']:.4f} "
                      f"scaling_factor {latents['scaling_factor']:.4f} ({time.time() - t0:.0f}s)")
    if args.stage == "data":
        return
    tokenizer = world.build_tokenizer()
    if args.stage in ("all", "transformer"):
        train_transformer(out, latents, scenes, tokenizer, args)
        if args.stage == "transformer":
            return
    state = torch.load(out / "transformer.pt")
    transformer, text_encoders = build_models(tokenizer)
    transformer.load_state_dict(state["ema"][0])
    for encoder, s in zip(text_encoders, state["ema"][1:]):
        encoder.load_state_dict(s)
    export_pipeline(args.export_dir, load_vae(args.vae), transformer, text_encoders, tokenizer, latents, args.shift,
                    args.fp16_export)
    pretrain.log(out, f"exported to {args.export_dir} (transformer step {state['step']}, "
                      f"{state['elapsed'] / 60:.1f} min)")


if __name__ == "__main__":
    main(parse_args())
