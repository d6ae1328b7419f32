"""Pre-train the tiny Stable Diffusion model of the shapes world, from scratch, reproducibly from a seed.

Two stages, each resumable from its last checkpoint:

1. ``vae``: an ``AutoencoderKL`` (32×32 RGB → 8×8×4 latents) on rendered scenes, reconstruction + a small KL term,
   as in Stable Diffusion's autoencoder; its ``scaling_factor`` is then set to 1 / std of the latents.
2. ``unet``: a ``UNet2DConditionModel`` and a small ``CLIPTextModel`` trained jointly on (latent, caption) pairs with
   the Stable Diffusion noise schedule (``DDPMScheduler``, scaled_linear 0.00085–0.012, 1000 steps, epsilon) and 10%
   empty captions, so classifier-free guidance works (PALP's alignment term queries the empty prompt).

The result is written in the standard diffusers layout, loadable with ``StableDiffusionPipeline.from_pretrained``:

    python examples/shapes_world/pretrain.py --output_dir runs/shapes_pretrain --export_dir examples/shapes_world/model
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import world


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Pre-train the shapes-world Stable Diffusion model.")
    parser.add_argument("--output_dir", type=str, default="runs/shapes_pretrain",
                        help="Where the rendered data, checkpoints and the log go.")
    parser.add_argument("--export_dir", type=str, default="examples/shapes_world/model",
                        help="Where the final pipeline is written (diffusers layout).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for data, initialisation and training.")
    parser.add_argument("--num_images", type=int, default=16000,
                        help="Rendered training scenes (held-out attribute combinations excluded).")
    parser.add_argument("--vae_steps", type=int, default=1500, help="Autoencoder training steps.")
    parser.add_argument("--vae_batch_size", type=int, default=16, help="Autoencoder batch size.")
    parser.add_argument("--vae_learning_rate", type=float, default=1e-3, help="Autoencoder learning rate.")
    parser.add_argument("--kl_weight", type=float, default=1e-6,
                        help="Weight of the KL term (Stable Diffusion's autoencoder uses a tiny one).")
    parser.add_argument("--unet_steps", type=int, default=20000,
                        help="UNet + text-encoder steps (training also stops at --max_unet_minutes).")
    parser.add_argument("--max_unet_minutes", type=float, default=75.0,
                        help="Wall-clock budget of the UNet stage, so pre-training ends on time on a slow machine.")
    parser.add_argument("--batch_size", type=int, default=32, help="UNet batch size.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="UNet and text-encoder learning rate.")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the exported weights.")
    parser.add_argument("--caption_dropout", type=float, default=0.1,
                        help="Fraction of empty captions (classifier-free guidance).")
    parser.add_argument("--checkpoint_minutes", type=float, default=5.0, help="Minutes between checkpoints.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--fp16_export", action=argparse.BooleanOptionalAction, default=True,
                        help="Store the exported weights in float16 (half the size; loads as float32 by default).")
    parser.add_argument("--stage", type=str, default="all", choices=["all", "data", "vae", "unet", "export"],
                        help="Run one stage only (each resumes from its checkpoint).")
    return parser.parse_args(input_args)


def log(out, message):
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(Path(out) / "log.txt", "a") as f:
        f.write(line + "\n")


def render_dataset(out, num_images, seed):
    """Render the pre-training scenes once (cached): uint8 images and their attribute dicts."""
    path = Path(out) / "data.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        return data["images"], json.loads(str(data["scenes"]))
    rng = np.random.default_rng(seed)
    images, scenes = [], []
    while len(scenes) < num_images:
        scene = world.random_scene(rng)
        if world.is_held_out(scene):
            continue
        scenes.append(scene)
        images.append(np.asarray(world.render(scene)))
    images = np.stack(images)
    np.savez(path, images=images, scenes=json.dumps(scenes))
    return images, scenes


def to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_text_encoder(vocab_size, max_length):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=max_length,
            layer_norm_eps=1e-5,
        )
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def train_vae(out, images, args):
    """Stage 1: reconstruction (L1 + MSE) + a tiny KL, as Stable Diffusion's autoencoder (minus the GAN)."""
    ckpt = Path(out) / "vae.pt"
    vae = build_vae()
    start = 0
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    gen = torch.Generator().manual_seed(args.seed + 1)
    last_save = time.time()
    for step in range(start, args.vae_steps):
        # Cosine decay: the last steps sharpen the stripes and dots.
        lr = args.vae_learning_rate * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (args.vae_batch_size,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + args.kl_weight * kl * x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(out, f"vae step {step} rec {rec.item():.4f} kl {kl.item():.4f} lr {lr:.2e}")
        if time.time() - last_save > args.checkpoint_minutes * 60 or step == args.vae_steps - 1:
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
            last_save = time.time()
    if start >= args.vae_steps:
        log(out, "vae already trained")
    return vae


@torch.no_grad()
def encode_dataset(out, vae, images):
    """Latent mean and std of every scene (cached), and the scaling factor 1 / std(latents)."""
    path = Path(out) / "latents.pt"
    if path.exists():
        return torch.load(path)
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images), 256):
        dist = vae.encode(to_tensor(images[i : i + 256])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.std())
    data = {"mean": mean, "std": std, "scaling_factor": scaling}
    torch.save(data, path)
    return data


def train_unet(out, latents, scenes, tokenizer, args):
    """Stage 2: UNet + text encoder, epsilon objective, 10% empty captions."""
    torch.manual_seed(args.seed + 2)
    ckpt = Path(out) / "unet.pt"
    unet = build_unet()
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.model_max_length)
    ema_unet, ema_text = build_unet(), build_text_encoder(len(tokenizer), tokenizer.model_max_length)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.01)
    start, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(args.seed + 3 + start)
    rng = np.random.default_rng(args.seed + 4 + start)
    mean, std, scale = latents["mean"], latents["std"], latents["scaling_factor"]
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))
    t_start, last_save, running = time.time(), time.time(), None
    step = start
    while step < args.unet_steps and elapsed + (time.time() - t_start) < args.max_unet_minutes * 60:
        warmup = min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = args.learning_rate * warmup
        idx = torch.randint(0, len(mean), (args.batch_size,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        captions = [
            "" if rng.random() < args.caption_dropout
            else world.caption(scenes[i], rng, p_drop_colour=0.2, p_drop_pattern=0.2, p_drop_background=0.2)
            for i in idx.tolist()
        ]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text_encoder(ids)[0]
        loss = F.mse_loss(unet(xt, t, cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in ema_pairs:
                ema_p.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        step += 1
        if step % 50 == 0:
            log(out, f"unet step {step} loss {loss.item():.4f} avg {running:.4f} "
                     f"elapsed {(elapsed + time.time() - t_start) / 60:.1f} min")
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save_unet_checkpoint(ckpt, unet, text_encoder, ema_unet, ema_text, opt, step,
                                 elapsed + time.time() - t_start)
            last_save = time.time()
    save_unet_checkpoint(ckpt, unet, text_encoder, ema_unet, ema_text, opt, step, elapsed + time.time() - t_start)
    log(out, f"unet done at step {step}, final avg loss {running}")
    return ema_unet, ema_text


def save_unet_checkpoint(path, unet, text_encoder, ema_unet, ema_text, opt, step, elapsed):
    tmp = str(path) + ".tmp"
    torch.save({"unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed}, tmp)
    os.replace(tmp, path)


def export_pipeline(export_dir, vae, unet, text_encoder, tokenizer, scaling_factor, fp16):
    """Write the standard diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if fp16:
        # diffusers loads float16 weights back as float32; transformers 5 would keep them float16, so the (tiny)
        # text encoder stays float32.
        pipe.unet.to(torch.float16)
        pipe.vae.to(torch.float16)
    pipe.save_pretrained(export_dir, safe_serialization=True)
    return pipe


def main(args):
    torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    images, scenes = render_dataset(out, args.num_images, args.seed)
    log(out, f"data: {len(images)} scenes ({time.time() - t0:.0f}s)")
    if args.stage == "data":
        return
    vae = train_vae(out, images, args) if args.stage in ("all", "vae") else None
    if args.stage == "vae":
        return
    if vae is None:
        vae = build_vae()
        vae.load_state_dict(torch.load(out / "vae.pt")["model"])
    latents = encode_dataset(out, vae, images)
    log(out, f"latents: scaling factor {latents['scaling_factor']:.4f}")
    tokenizer = world.build_tokenizer()
    if args.stage in ("all", "unet"):
        unet, text_encoder = train_unet(out, latents, scenes, tokenizer, args)
    else:
        state = torch.load(out / "unet.pt")
        unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer), tokenizer.model_max_length)
        unet.load_state_dict(state["ema_unet"])
        text_encoder.load_state_dict(state["ema_text"])
    export_pipeline(args.export_dir, vae, unet, text_encoder, tokenizer, latents["scaling_factor"], args.fp16_export)
    log(out, f"exported to {args.export_dir}; total wall time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main(parse_args())
