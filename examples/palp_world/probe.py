"""The world's stand-in for CLIP: a small CNN that reads a scene's elements back from its pixels.

The paper scores text alignment as CLIP similarity to the *clean* prompt, element by element (style, class,
ambiance), and identity as image similarity to the subject's photos. Here the world knows the truth of every
render, so a classifier trained on renders reads the same things off an image directly:

- ``text_alignment``: the mean, over the elements the clean prompt names, of the probe's probability for that
  element (e.g. for "a sketch of a cat in paris": P(style=sketch), P(class=cat), P(setting=paris)).
- ``identity``: the probability that the image shows the given subject (in whatever style or setting).
- ``home``: the probability of the subjects' photo background, the overfitting PALP is meant to remove.

It is trained on renders with and without the subjects, with noise and blur so that it tolerates the artefacts
of a small diffusion model's samples.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from world import CLASSES, COLOURS, HOME, SETTINGS, STYLES, SUBJECTS, Scene, render_dataset

# Head name -> the values it tells apart. "colour" has "other" for the subjects' own colours; "setting" has HOME.
HEADS = {
    "style": STYLES,
    "class": CLASSES,
    "colour": tuple(COLOURS) + ("other",),
    "setting": SETTINGS + (HOME,),
    "identity": ("none",) + tuple(SUBJECTS),
}


def scene_labels(scene: Scene):
    """The index of ``scene``'s value for every head. A sketch is grey: its colour is not in the picture."""
    colour = "other" if scene.subject is not None else scene.colour
    if scene.style == "sketch":
        colour = None
    return {
        "style": STYLES.index(scene.style),
        "class": CLASSES.index(scene.cls),
        "colour": HEADS["colour"].index(colour) if colour is not None else -100,  # -100: ignored by the loss
        "setting": HEADS["setting"].index(scene.setting),
        "identity": HEADS["identity"].index(scene.subject or "none"),
    }


class Probe(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU(),  # 16
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),  # 8
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),  # 4
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.GELU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in HEADS.items()})

    def forward(self, images):
        """``images``: float (N, 3, 32, 32) in [-1, 1], as the VAE and the pipelines use them."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def _augment(x, generator):
    # Blur some, add noise to all: a small diffusion model's samples are both softer and noisier than renders.
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(x.shape[0], 1, 1, 1, generator=generator)
    x = torch.where(mix < 0.3, blurred, x)
    sigma = 0.15 * torch.rand(x.shape[0], 1, 1, 1, generator=generator)
    return x + sigma * torch.randn(x.shape, generator=generator)


def train_probe(n_images=12000, steps=1500, batch_size=64, lr=2e-3, seed=0, log_every=0):
    """Train a probe on fresh renders (a third of them show a subject) and return it in eval mode."""
    scenes, images = render_dataset(n_images, seed=seed + 1000, subject_fraction=0.35)
    x_all = to_tensor(images)
    labels = {name: torch.tensor([scene_labels(s)[name] for s in scenes]) for name in HEADS}
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    probe = Probe()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for step in range(steps):
        idx = torch.randint(0, n_images, (batch_size,), generator=generator)
        logits = probe(_augment(x_all[idx], generator))
        loss = sum(F.cross_entropy(logits[name], labels[name][idx], ignore_index=-100) for name in HEADS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and step % log_every == 0:
            print(f"probe step {step}: loss {loss.item():.3f}")
    return probe.eval()


@dataclass
class Scores:
    text_alignment: float
    identity: float
    home: float
    per_element: dict


@torch.no_grad()
def score(probe: Probe, images: torch.Tensor, clean_scene: Scene, subject=None) -> Scores:
    """Score generated ``images`` (float (N, 3, 32, 32) in [-1, 1]) against the clean prompt's ``clean_scene``
    and, where given, the ``subject`` they are meant to show. Every number is a mean probability in [0, 1]."""
    probs = {name: logits.softmax(-1) for name, logits in probe(images).items()}
    named = {"style": clean_scene.style, "class": clean_scene.cls}
    if clean_scene.colour and clean_scene.say_colour:
        named["colour"] = clean_scene.colour
    if clean_scene.setting:
        named["setting"] = clean_scene.setting
    per_element = {name: probs[name][:, HEADS[name].index(value)].mean().item() for name, value in named.items()}
    identity = probs["identity"][:, HEADS["identity"].index(subject)].mean().item() if subject else float("nan")
    home = probs["setting"][:, HEADS["setting"].index(HOME)].mean().item()
    return Scores(
        text_alignment=float(np.mean(list(per_element.values()))),
        identity=identity,
        home=home,
        per_element=per_element,
    )


def save_probe(probe: Probe, path):
    torch.save(probe.state_dict(), path)


def load_probe(path) -> Probe:
    probe = Probe()
    probe.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return probe.eval()
