"""The probe: a small CNN trained on the world's ground truth that reads an image and predicts its attributes, and the
two metrics built on it.

- **Prompt alignment** of an image for a clean target prompt ``y_c`` = the fraction of the prompt's elements that the
  probe finds in the image. The elements are the attributes the prompt names (``world.parse_caption``): its style,
  its class noun, and, where named, the background colour, the companion object and night.
- **Subject fidelity** of an image for a subject = the fraction of the subject's identity attributes (its class,
  colour and fill pattern) that the probe finds in the image. A subject's colour or pattern may be one the base model
  never saw (``orange``, ``checkered``, ``ringed``); the probe knows them because it is trained on every rendering.

Train (about 25 minutes on one shared CPU core) and write ``probe/`` next to this file:

    python examples/shapes_world/probe.py train --output_dir examples/shapes_world/probe

The second probe (``probe_b/``: another seed, another augmentation, see ``augment_b``):

    python examples/shapes_world/probe.py train --variant b --seed 1 --steps 1200 \
        --output_dir examples/shapes_world/probe_b

Accuracy on held-out renderings, and on the base model's samples of held-out captions:

    python examples/shapes_world/probe.py evaluate --model examples/shapes_world/model

and on the flow-matching world's (``model_flow/``, sampled with its own Euler flow scheduler):

    python examples/shapes_world/probe.py evaluate --model examples/shapes_world/model_flow --steps 10
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import world

HERE = Path(__file__).resolve().parent
DEFAULT_PROBE = HERE / "probe"
IDENTITY = ("shape", "colour", "pattern")


class Probe(nn.Module):
    """Three conv stages (32→16→8→4 pixels) and one linear head per attribute. Spatial layout is kept to the end,
    because the companion and the moon are told apart by where they are."""

    def __init__(self, attributes=None, width=32):
        super().__init__()
        self.attributes = dict(attributes or world.ATTRIBUTES)

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.SiLU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(v)) for name, v in self.attributes.items()})

    def forward(self, x):
        """``x``: images in [-1, 1], shape (B, 3, 32, 32). Returns {attribute: logits}."""
        h = self.trunk(self.features(x))
        return {name: head(h) for name, head in self.heads.items()}


def images_to_tensor(images):
    """PIL images, uint8 arrays (B, H, W, 3) or float arrays in [0, 1] → a (B, 3, 32, 32) tensor in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
        arr = np.asarray(images)
        x = torch.from_numpy(arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0))
        x = x.permute(0, 3, 1, 2) * 2 - 1
    if x.shape[-1] != 32:
        x = F.interpolate(x, size=(32, 32), mode="area")
    return x


def load_probe(path=DEFAULT_PROBE):
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    probe = Probe(config["attributes"], config["width"])
    state = {k: v.float() for k, v in load_file(str(path / "probe.safetensors")).items()}
    probe.load_state_dict(state)
    return probe.eval()


@torch.no_grad()
def classify(probe, images, batch_size=256):
    """Predicted attribute names for each image: a list of dicts like {"shape": "star", "night": "day", ...}."""
    x = images_to_tensor(images)
    preds = []
    for i in range(0, len(x), batch_size):
        logits = probe(x[i : i + batch_size])
        idx = {name: logit.argmax(-1).tolist() for name, logit in logits.items()}
        for j in range(len(next(iter(idx.values())))):
            preds.append({name: probe.attributes[name][idx[name][j]] for name in idx})
    return preds


def prompt_elements(clean_prompt):
    """The elements a clean prompt asks for, in the probe's vocabulary (e.g. {"style": "sketch", "shape": "star",
    "background": "blue"})."""
    return world.parse_caption(clean_prompt)


def prompt_alignment(pred, clean_prompt):
    """Fraction of the clean prompt's elements present in an image (``pred`` from ``classify``)."""
    elements = prompt_elements(clean_prompt)
    return sum(pred[k] == v for k, v in elements.items()) / len(elements)


def subject_fidelity(pred, subject):
    """Fraction of the subject's identity attributes (class, colour, pattern) present in an image."""
    return sum(pred[k] == subject[k] for k in IDENTITY) / len(IDENTITY)


# ----------------------------------------------------------------------------------------------------------------
# Training


def augment(x, gen):
    """Make rendered scenes look like samples of a tiny diffusion model: blur (an autoencoder's softness) and noise.
    Colour is left alone: it is a label."""
    b = x.shape[0]
    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        small = F.interpolate(x[blur], size=(16, 16), mode="area")
        x = x.clone()
        x[blur] = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    shift = torch.randint(-1, 2, (2,), generator=gen)
    x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
    return x + 0.06 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)


def _box_blur(x, factor):
    """Area-downsample by ``factor`` and bilinear-upsample back: the softness of a lossy autoencoder."""
    size = x.shape[-1]
    small = F.interpolate(x, size=(size // factor, size // factor), mode="area")
    return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)


def augment_b(x, gen, pattern_labels):
    """Probe B's augmentation (independent of ``augment``): what a tiny diffusion model's samples and a personalized
    model's copies of its photos look like, with labels that stay honest.

    - blur of three strengths: none, mild (÷2, the pattern label kept), strong (÷4: a 3-pixel check, ring or stripe
      no longer shows, so the pattern label becomes ``plain``: the probe must report a pattern only where one is
      visible);
    - pale blending of the whole image towards white or mid grey (up to 35%), contrast (×0.7–1.3) and brightness
      (±0.12) jitter: a pale or washed-out plain fill must not read as a pattern; hue is untouched (colour is a label);
    - scale jitter (zoom 0.85–1.15 about the centre), a shift of up to 2 pixels, and Gaussian noise.
    Returns the augmented images and the (possibly relabelled) pattern labels."""
    b = x.shape[0]
    x = x.clone()
    pattern_labels = pattern_labels.clone()
    level = torch.multinomial(torch.tensor([0.4, 0.4, 0.2]), b, replacement=True, generator=gen)
    for lv, factor in ((1, 2), (2, 4)):
        sel = level == lv
        if sel.any():
            x[sel] = _box_blur(x[sel], factor)
    pattern_labels[level == 2] = world.ATTRIBUTES["pattern"].index("plain")
    zoom = 0.85 + 0.3 * torch.rand(b, generator=gen)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    x = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), mode="bilinear",
                      padding_mode="border", align_corners=False)
    pale = (torch.rand(b, 1, 1, 1, generator=gen) < 0.4) * 0.35 * torch.rand(b, 1, 1, 1, generator=gen)
    target = torch.where(torch.rand(b, 1, 1, 1, generator=gen) < 0.5, torch.ones(b, 1, 1, 1), torch.zeros(b, 1, 1, 1))
    x = (1 - pale) * x + pale * target
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 0.7 + 0.6 * torch.rand(b, 1, 1, 1, generator=gen)
    brightness = 0.24 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = ((x - mean) * contrast + mean + brightness).clamp(-1, 1)
    shift = torch.randint(-2, 3, (2,), generator=gen)
    x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
    return x + 0.08 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen), pattern_labels


def render_set(n, seed, held_out=None, cache_dir=None):
    """``n`` scenes (hidden appearances included) and their labels. ``held_out``: only (True) / never (False) the
    held-out attribute combinations; None: any. With ``cache_dir`` the rendering is stored and reused."""
    cache = Path(cache_dir) / f"probe_data_{n}_{seed}_{held_out}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        data = np.load(cache)
        return data["images"], {name: torch.from_numpy(data[name]) for name in world.ATTRIBUTES}
    rng = np.random.default_rng(seed)
    images, labels = [], []
    while len(images) < n:
        scene = world.random_scene(rng, hidden=True)
        if held_out is not None and world.is_held_out(scene) != held_out:
            continue
        images.append(np.asarray(world.render(scene)))
        labels.append(world.scene_labels(scene))
    y = {name: torch.tensor([label[name] for label in labels]) for name in world.ATTRIBUTES}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=np.stack(images), **{k: v.numpy() for k, v in y.items()})
    return np.stack(images), y


def train(args):
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    images, labels = render_set(args.num_images, args.seed, held_out=False, cache_dir=args.cache_dir)
    x_all = images_to_tensor(images)
    probe = Probe(width=args.width)
    opt = torch.optim.AdamW(probe.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        lr = args.learning_rate * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        batch_labels = {k: v[idx] for k, v in labels.items()}
        if args.variant == "b":
            x, batch_labels["pattern"] = augment_b(x_all[idx], gen, batch_labels["pattern"])
        else:
            x = augment(x_all[idx], gen)
        logits = probe(x)
        loss = sum(F.cross_entropy(logits[k], batch_labels[k]) for k in logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"probe step {step} loss {loss.item():.4f}", flush=True)
    save_probe(probe.eval(), args.output_dir, args.width)
    test_images, test_labels = render_set(2000, args.seed + 1, held_out=True, cache_dir=args.cache_dir)
    acc = accuracy(probe, test_images, test_labels)
    print(json.dumps({"held_out_render_accuracy": acc}, indent=1))
    Path(args.output_dir, "accuracy.json").write_text(json.dumps({"held_out_render_accuracy": acc}, indent=1))


def save_probe(probe, folder, width):
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in probe.state_dict().items()}, str(folder / "probe.safetensors"))
    (folder / "config.json").write_text(json.dumps({"attributes": probe.attributes, "width": width}, indent=1))


@torch.no_grad()
def accuracy(probe, images, labels):
    preds = classify(probe.eval(), images)
    return {
        name: round(float(np.mean([world.ATTRIBUTES[name].index(p[name]) == int(labels[name][i])
                                   for i, p in enumerate(preds)])), 4)
        for name in world.ATTRIBUTES
    }


# ----------------------------------------------------------------------------------------------------------------
# The base model, read by the probe


def load_pipeline(model, scheduler="dpm"):
    """The shapes-world pipeline on CPU with a fast sampler: DPM-Solver++ by default for the UNet world (``model/``);
    the flow-matching world (``model_flow/``, a ``StableDiffusion3Pipeline`` folder) keeps its Euler flow sampler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

    if is_flow_model(model):
        pipe = StableDiffusion3Pipeline.from_pretrained(model, text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    if scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_flow_model(model):
    index = Path(model) / "model_index.json"
    return index.exists() and json.loads(index.read_text())["_class_name"] == "StableDiffusion3Pipeline"


def sampling_kwargs(pipe):
    """Call arguments a shapes-world pipeline needs beyond the prompt: the flow world's transformer was trained with
    no T5 tokens after the CLIP tokens (``pretrain_flow.T5_SEQUENCE_LENGTH``), and is sampled so."""
    if "transformer" not in pipe.components:
        return {}
    from pretrain_flow import T5_SEQUENCE_LENGTH

    return {"max_sequence_length": T5_SEQUENCE_LENGTH}


def generate(pipe, prompts, seed=0, guidance_scale=5.0, steps=20, batch_size=32):
    """One 32×32 sample per prompt (uint8 arrays), seeded per batch."""
    out = []
    for i in range(0, len(prompts), batch_size):
        gen = torch.Generator().manual_seed(seed + i)
        images = pipe(list(prompts[i : i + batch_size]), height=32, width=32, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=gen, output_type="np", **sampling_kwargs(pipe)).images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def autoencoder_round_trip(vae, images):
    """``images`` (uint8, N×32×32×3) encoded to the posterior mean and decoded again: what the autoencoder keeps of a
    scene, and so the most a diffusion model working in its latent space can draw."""
    x = images_to_tensor(images)
    out = []
    for i in range(0, len(x), 256):
        recon = vae.decode(vae.encode(x[i : i + 256]).latent_dist.mean).sample
        out.append(((recon.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy())
    return np.concatenate(out)


def evaluate_base(args):
    """Per-attribute accuracy of the probe on the base model's samples of held-out captions (full captions, every
    attribute named; held-out combinations were never in pre-training), and on the autoencoder's reconstructions of
    held-out rendered scenes (subjects' appearances included): the ceiling of what the model can draw."""
    torch.set_num_threads(args.num_threads)
    probe = load_probe(args.probe)
    pipe = load_pipeline(args.model)
    images, labels = render_set(args.num_samples, args.seed + 1, held_out=True)
    round_trip = accuracy(probe, autoencoder_round_trip(pipe.vae, images), labels)
    print("autoencoder round trip", json.dumps(round_trip), flush=True)
    rng = np.random.default_rng(args.seed)
    scenes = []
    while len(scenes) < args.num_samples:
        scene = world.random_scene(rng)
        if world.is_held_out(scene):
            scenes.append(scene)
    captions = [world.caption(s) for s in scenes]
    results = {}
    for scale in args.guidance_scales:
        images = generate(pipe, captions, seed=args.seed, guidance_scale=scale, steps=args.steps)
        preds = classify(probe, images)
        per_attr = {}
        for name in world.ATTRIBUTES:
            hits = [p[name] == world.ATTRIBUTES[name][world.scene_labels(s)[name]] for p, s in zip(preds, scenes)]
            per_attr[name] = round(float(np.mean(hits)), 4)
        per_attr["all_attributes_right"] = round(float(np.mean(
            [all(p[n] == world.ATTRIBUTES[n][world.scene_labels(s)[n]] for n in world.ATTRIBUTES)
             for p, s in zip(preds, scenes)])), 4)
        results[f"guidance_{scale}"] = per_attr
        print(scale, json.dumps(per_attr), flush=True)
        if args.grid:
            save_grid(images[:64], f"{args.grid}_g{scale}.png")
    if args.output:
        Path(args.output).write_text(json.dumps({"autoencoder_round_trip_held_out_renders": round_trip,
                                                 "base_model_held_out_captions": results,
                                                 "num_samples": args.num_samples, "steps": args.steps}, indent=1))
    return results


def save_grid(images, path, cols=8, scale=2):
    from PIL import Image

    n = len(images)
    rows = (n + cols - 1) // cols
    h, w = images.shape[1:3]
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(Image.fromarray(im), ((i % cols) * w, (i // cols) * h))
    grid.resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Train or evaluate the shapes-world probe.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="Train the probe on rendered scenes.")
    t.add_argument("--output_dir", type=str, default=str(DEFAULT_PROBE), help="Where the probe is written.")
    t.add_argument("--num_images", type=int, default=10000, help="Rendered training scenes.")
    t.add_argument("--steps", type=int, default=2000, help="Training steps.")
    t.add_argument("--batch_size", type=int, default=64, help="Batch size.")
    t.add_argument("--learning_rate", type=float, default=2e-3, help="Peak learning rate (cosine decay).")
    t.add_argument("--cache_dir", type=str, default="runs/shapes_probe_data",
                   help="Where rendered training/test scenes are cached.")
    t.add_argument("--width", type=int, default=16, help="Channels of the first conv stage.")
    t.add_argument("--seed", type=int, default=0, help="Seed of data and initialisation.")
    t.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    t.add_argument("--variant", type=str, default="a", choices=["a", "b"],
                   help="Augmentation: 'a' (the shipped probe/: blur ÷2 and noise) or 'b' (the second probe, probe_b/:"
                        " blur of three strengths with the pattern relabelled 'plain' where it no longer shows, pale"
                        " blending, contrast/brightness and scale jitter; see augment_b). Train probe B with"
                        " --variant b --seed 1 --output_dir examples/shapes_world/probe_b.")
    e = sub.add_parser("evaluate", help="Probe accuracy on the base model's samples of held-out captions.")
    e.add_argument("--model", type=str, default=str(HERE / "model"), help="The shapes-world pipeline folder.")
    e.add_argument("--probe", type=str, default=str(DEFAULT_PROBE), help="The probe folder.")
    e.add_argument("--num_samples", type=int, default=256, help="Held-out captions to sample (one image each).")
    e.add_argument("--steps", type=int, default=20,
                   help="Sampling steps (DPM-Solver++ for model/, the flow-matching Euler sampler for model_flow/).")
    e.add_argument("--guidance_scales", type=float, nargs="+", default=[5.0], help="CFG scales to evaluate.")
    e.add_argument("--seed", type=int, default=1234, help="Seed of captions and sampling.")
    e.add_argument("--grid", type=str, default=None, help="Path prefix for a grid of the first 64 samples.")
    e.add_argument("--output", type=str, default=None, help="Write the figures to this JSON file.")
    e.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    args = parse_args()
    if args.command == "train":
        train(args)
    else:
        evaluate_base(args)
