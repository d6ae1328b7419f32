"""Pre-train the tiny Stable Diffusion model of the shapes world, from scratch, reproducibly from a seed.

Stages (``--stage``), each resumable from its last checkpoint in ``--output_dir``:

1. ``data``: render the pre-training scenes once (held-out attribute combinations and the subjects' appearances are
   never shown).
2. ``vae``: an ``AutoencoderKL`` (32×32 RGB → 8×8×8 latents): reconstruction + a small KL term, as Stable
   Diffusion's autoencoder (without the GAN), plus a term that keeps the image's colour in latent channels 0–2. It
   is trained on any scene of the world, subjects' appearances included (a generic image codec, as Stable
   Diffusion's); the UNet never sees those appearances.
3. ``unet``: a ``UNet2DConditionModel`` and a small ``CLIPTextModel`` trained jointly on (latent, caption) pairs with
   the Stable Diffusion noise schedule (``DDPMScheduler``, scaled_linear 0.00085–0.012, 1000 steps, epsilon) and 10%
   empty captions, so classifier-free guidance works (PALP's alignment term queries the empty prompt).
4. ``decoder``: fine-tune the decoder with the encoder frozen (may run alongside ``unet``: the latents do not move).
5. ``export``: write the standard diffusers layout, loadable with ``StableDiffusionPipeline.from_pretrained``.

``--stage all`` (the default) runs them in order:

    python examples/shapes_world/pretrain.py --output_dir runs/shapes_pretrain --export_dir examples/shapes_world/model

README.md lists the exact commands, wall times and losses of the shipped model.
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

# The autoencoder must keep what makes a subject itself (its outline, colour and fill pattern, down to 3-pixel
# checks) or no personalization can: with (16, 32, 64) channels and 4 latent channels, trained only on the captioned
# scenes, a checkered star came back as a yellow disc. 8 latent channels cost the UNet only its first and last conv.
VAE_CHANNELS = (32, 64, 64)
LATENT_CHANNELS = 8


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Pre-train the shapes-world Stable Diffusion model.")
    parser.add_argument("--output_dir", type=str, default="runs/shapes_pretrain",
                        help="Where the rendered data, checkpoints and the log go.")
    parser.add_argument("--export_dir", type=str, default="examples/shapes_world/model",
                        help="Where the final pipeline is written (diffusers layout).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for data, initialisation and training.")
    parser.add_argument("--num_images", type=int, default=16000,
                        help="Rendered training scenes (held-out attribute combinations excluded).")
    parser.add_argument("--num_vae_images", type=int, default=16000,
                        help="Rendered scenes for the autoencoder (any scene, subjects' appearances included).")
    parser.add_argument("--vae_steps", type=int, default=2500, help="Autoencoder training steps.")
    parser.add_argument("--vae_batch_size", type=int, default=16, help="Autoencoder batch size.")
    parser.add_argument("--vae_crop", type=int, default=32,
                        help="Train the autoencoder on random crops of this size (32: whole images).")
    parser.add_argument("--vae_learning_rate", type=float, default=1e-3, help="Autoencoder learning rate.")
    parser.add_argument("--latent_noise", type=float, default=0.1,
                        help="Std of the noise added to the posterior mean while training the autoencoder (ours).")
    parser.add_argument("--latent_colour_weight", type=float, default=1.0,
                        help="Weight of the loss tying latent channels 0-2 to the average-pooled image (ours).")
    parser.add_argument("--kl_weight", type=float, default=1e-6,
                        help="Weight of the KL term (Stable Diffusion's autoencoder uses a tiny one).")
    parser.add_argument("--decoder_steps", type=int, default=0,
                        help="Decoder fine-tuning steps (also stops at --max_decoder_minutes); 0 skips the stage.")
    parser.add_argument("--max_decoder_minutes", type=float, default=60.0,
                        help="Wall-clock budget of the decoder fine-tuning stage.")
    parser.add_argument("--decoder_learning_rate", type=float, default=3e-4, help="Decoder fine-tuning learning rate.")
    parser.add_argument("--unet_steps", type=int, default=4500,
                        help="UNet + text-encoder steps (training also stops at --max_unet_minutes).")
    parser.add_argument("--max_unet_minutes", type=float, default=1000.0,
                        help="Wall-clock budget of the UNet stage, so pre-training ends on time on a slow machine.")
    parser.add_argument("--batch_size", type=int, default=32, help="UNet batch size.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="UNet and text-encoder learning rate.")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the exported weights.")
    parser.add_argument("--caption_dropout", type=float, default=0.1,
                        help="Fraction of empty captions (classifier-free guidance).")
    parser.add_argument("--checkpoint_minutes", type=float, default=3.0, help="Minutes between checkpoints.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--fp16_export", action=argparse.BooleanOptionalAction, default=True,
                        help="Store the exported weights in float16 (half the size; loads as float32 by default).")
    parser.add_argument("--stage", type=str, default="all", choices=["all", "data", "vae", "unet", "decoder", "export"],
                        help="Run one stage only (each resumes from its checkpoint).")
    return parser.parse_args(input_args)


def optimizer_step_with_ema(loss, opt, params, ema_pairs, step, ema_decay):
    """One optimizer step on ``loss`` (gradient norm clipped to 1), then the EMA weights move towards the trained
    ones with a decay that warms up as min(ema_decay, (1 + step) / (10 + step))."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema_p, p in ema_pairs:
            ema_p.lerp_(p, 1 - decay)


def log(out, message):
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(Path(out) / "log.txt", "a") as f:
        f.write(line + "\n")


def render_dataset(out, num_images, seed, codec=False):
    """Render a training set once (cached): uint8 images and their attribute dicts.

    The UNet's set (``codec=False``) leaves out the held-out combinations and the subjects' appearances. The
    autoencoder's set (``codec=True``) draws from every scene the world can render, subjects' colour and patterns
    included: as Stable Diffusion's autoencoder, it is a generic image codec trained on broader data than the
    text-to-image model, so a personal subject can be encoded even though no caption can describe it."""
    path = Path(out) / ("codec_data.npz" if codec else "data.npz")
    if path.exists():
        data = np.load(path, allow_pickle=False)
        return data["images"], json.loads(str(data["scenes"]))
    rng = np.random.default_rng(seed)
    images, scenes = [], []
    while len(scenes) < num_images:
        scene = world.random_scene(rng, hidden=codec)
        if not codec and world.is_held_out(scene):
            continue
        scenes.append(scene)
        images.append(np.asarray(world.render(scene)))
    images = np.stack(images)
    np.savez(path, images=images, scenes=json.dumps(scenes))
    return images, scenes


def to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def build_vae(channels=VAE_CHANNELS, latent_channels=LATENT_CHANNELS):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        # One group: GroupNorm then normalises over all channels together, which keeps the ratios between colour
        # channels; with a few channels per group, a flat coloured background normalises to the same features
        # whatever its colour, and the autoencoder learns colour very slowly.
        norm_num_groups=1,
        sample_size=32,
    )


def build_unet(latent_channels=LATENT_CHANNELS):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=latent_channels,
        out_channels=latent_channels,
        # Two levels (8×8 and 4×4, cross-attention at both): on a CPU the cost is mostly per layer, not per
        # channel, so fewer, wider blocks train and personalize fastest.
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
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


def random_crop(x, size, gen):
    """One random ``size``×``size`` window of the batch (on a multiple of 4 pixels, the autoencoder's stride). The
    autoencoder is convolutional, so training on crops costs a quarter of the compute per image at 16 px."""
    if size >= x.shape[-1]:
        return x
    top, left = (torch.randint(0, (x.shape[-1] - size) // 4 + 1, (2,), generator=gen) * 4).tolist()
    return x[:, :, top : top + size, left : left + size]


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
    # Seeded by the start step, so a resumed run is as reproducible as an uninterrupted one.
    gen = torch.Generator().manual_seed(args.seed + 1 + start)
    last_save = time.time()
    for step in range(start, args.vae_steps):
        # Cosine decay: the last steps sharpen the stripes and dots.
        lr = args.vae_learning_rate * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (args.vae_batch_size,), generator=gen)
        x = random_crop(to_tensor(images[idx.numpy()]), args.vae_crop, gen)
        posterior = vae.encode(x).latent_dist
        # Decode the posterior mean plus a little noise, not a full-variance sample: with unit variance at
        # initialisation the decoder sees mostly noise and, on one CPU core, would need far more steps to learn.
        # The noise keeps the decoder tolerant of the small latent errors of the diffusion model.
        z = posterior.mean + args.latent_noise * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        # Three latent channels are asked to hold the image's colour at latent resolution: through the
        # autoencoder's per-image GroupNorms colour is otherwise the last thing it learns, and the subjects'
        # identity is largely colour and pattern.
        thumbnail = F.avg_pool2d(x, x.shape[-1] // posterior.mean.shape[-1])
        colour = F.mse_loss(posterior.mean[:, :3], thumbnail)
        loss = rec + args.kl_weight * kl * x[0].numel() + args.latent_colour_weight * colour
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(out, f"vae step {step} rec {rec.item():.4f} kl {kl.item():.4f} colour {colour.item():.4f} lr {lr:.2e}")
        if time.time() - last_save > args.checkpoint_minutes * 60 or step == args.vae_steps - 1:
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
            last_save = time.time()
    if start >= args.vae_steps:
        log(out, "vae already trained")
    return vae


def finetune_decoder(out, vae, images, args):
    """Stage 3 (may run alongside stage 2): sharpen the decoder with the encoder frozen, as Stable Diffusion's
    ft-MSE decoder. The latent space the UNet learns is the encoder's, so it does not move."""
    ckpt = Path(out) / "decoder.pt"
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.decoder_learning_rate, weight_decay=0.0)
    start, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.decoder.load_state_dict(state["decoder"])
        vae.post_quant_conv.load_state_dict(state["post_quant_conv"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
    gen = torch.Generator().manual_seed(args.seed + 5 + start)
    t_start, last_save = time.time(), time.time()
    step = start

    def save():
        torch.save({"decoder": vae.decoder.state_dict(), "post_quant_conv": vae.post_quant_conv.state_dict(),
                    "opt": opt.state_dict(), "step": step, "elapsed": elapsed + time.time() - t_start}, ckpt)

    while step < args.decoder_steps and elapsed + (time.time() - t_start) < args.max_decoder_minutes * 60:
        idx = torch.randint(0, len(images), (args.vae_batch_size,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mean
        z = mean + args.latent_noise * torch.randn(mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(out, f"decoder step {step} rec {loss.item():.4f}")
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save()
            last_save = time.time()
    save()
    log(out, f"decoder done at step {step}")
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
    mean, scale = latents["mean"], latents["scaling_factor"]
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))
    t_start, last_save, running = time.time(), time.time(), None
    step = start
    while step < args.unet_steps and elapsed + (time.time() - t_start) < args.max_unet_minutes * 60:
        warmup = min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = args.learning_rate * warmup
        idx = torch.randint(0, len(mean), (args.batch_size,), generator=gen)
        # Latents are the posterior means (the autoencoder was trained to decode means).
        x0 = mean[idx] * scale
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
        optimizer_step_with_ema(loss, opt, params, ema_pairs, step, args.ema_decay)
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


def set_posterior_std(vae, std):
    """Make the encoder's posterior N(mean, std²) with a fixed ``std``: the decoder was trained on exactly such
    samples, and fine-tuning scripts call ``latent_dist.sample()``. The KL term alone would leave the (unused)
    log-variance near 0, i.e. noise of std 1, far larger than the latents' own spread."""
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:] = 0.0
        vae.quant_conv.bias[latent:] = 2.0 * math.log(std)


def export_pipeline(export_dir, vae, unet, text_encoder, tokenizer, scaling_factor, fp16, latent_noise=0.1):
    """Write the standard diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    set_posterior_std(vae, latent_noise)
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


def load_vae(out):
    vae = build_vae()
    vae.load_state_dict(torch.load(Path(out) / "vae.pt")["model"])
    decoder = Path(out) / "decoder.pt"
    if decoder.exists():
        state = torch.load(decoder)
        vae.decoder.load_state_dict(state["decoder"])
        vae.post_quant_conv.load_state_dict(state["post_quant_conv"])
    return vae.eval()


def reconstruction_error(vae, seed, n=256):
    """Mean absolute error (0–255 scale) of autoencoding ``n`` fresh scenes, subjects' appearances included."""
    rng = np.random.default_rng(seed)
    x = np.stack([np.asarray(world.render(world.random_scene(rng, hidden=True))) for _ in range(n)])
    with torch.no_grad():
        recon = vae.decode(vae.encode(to_tensor(x)).latent_dist.mean).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    return float(np.abs(recon - x).mean())


def main(args):
    torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    images, scenes = render_dataset(out, args.num_images, args.seed)
    codec_images, _ = render_dataset(out, args.num_vae_images, args.seed + 7, codec=True)
    log(out, f"data: {len(images)} scenes for the UNet, {len(codec_images)} for the autoencoder "
             f"({time.time() - t0:.0f}s)")
    if args.stage == "data":
        return
    if args.stage in ("all", "vae"):
        vae = train_vae(out, codec_images, args).eval()
        log(out, f"autoencoder reconstruction MAE {reconstruction_error(vae, args.seed + 6):.2f} / 255")
        if args.stage == "vae":
            return
    if args.stage == "decoder":
        vae = finetune_decoder(out, load_vae(out), codec_images, args).eval()
        log(out, f"autoencoder reconstruction MAE after decoder fine-tuning "
                 f"{reconstruction_error(vae, args.seed + 6):.2f} / 255")
        return
    # The UNet's latents come from the stage-1 encoder, whatever the decoder stage does.
    latents = encode_dataset(out, load_vae(out), images)
    log(out, f"latents: scaling factor {latents['scaling_factor']:.4f}")
    tokenizer = world.build_tokenizer()
    if args.stage in ("all", "unet"):
        train_unet(out, latents, scenes, tokenizer, args)
        if args.stage == "unet":
            return
    if args.stage == "all" and args.decoder_steps > 0:
        vae = finetune_decoder(out, load_vae(out), codec_images, args).eval()
        log(out, f"autoencoder reconstruction MAE after decoder fine-tuning "
                 f"{reconstruction_error(vae, args.seed + 6):.2f} / 255")
    state = torch.load(out / "unet.pt")
    unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer), tokenizer.model_max_length)
    unet.load_state_dict(state["ema_unet"])
    text_encoder.load_state_dict(state["ema_text"])
    vae = load_vae(out)
    export_pipeline(args.export_dir, vae, unet, text_encoder, tokenizer, latents["scaling_factor"], args.fp16_export,
                    args.latent_noise)
    log(out, f"exported to {args.export_dir} (UNet step {state['step']}, {state['elapsed'] / 60:.1f} min)")


if __name__ == "__main__":
    main(parse_args())
