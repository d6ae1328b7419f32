"""A procedural 32×32 world with captions, small enough to pre-train a text-to-image model on a CPU.

PALP needs three things that real Stable Diffusion has and a randomly initialised test model does not:

1. a *pre-trained* model that already knows the target prompt's elements ("a sketch of a cat in paris"),
2. a *subject* the model has never seen, photographed always in the same surroundings (so plain
   personalization overfits and paints those surroundings back into every prompt),
3. a way to *measure* text alignment and subject identity (the paper uses CLIP; we use a probe, see probe.py).

This file gives (1)'s training data and (2): every image is rendered from a :class:`Scene` whose caption states
its elements (style, class, colour, setting). The subjects ("my cat", "my dog") have a look no generic scene
uses, and their photos always show the same "home" (a peach wall over a checkered floor), a setting that no
caption names. Everything is numpy; a scene renders in well under a millisecond.
"""

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

SIZE = 32

STYLES = ("photo", "sketch", "watercolor", "oil painting")
STYLE_PHRASES = {
    "photo": "a photo of",
    "sketch": "a sketch of",
    "watercolor": "a watercolor of",
    "oil painting": "an oil painting of",
}
CLASSES = ("cat", "dog", "toy")
COLOURS = {"red": (205, 45, 40), "green": (40, 150, 60), "blue": (50, 75, 210)}
# "" is a plain background and is never named in a caption; "home" is where the subjects' photos are taken and is
# never named either: a model that paints it when the prompt says "in paris" has overfitted the photos.
SETTINGS = ("", "in paris", "on rock", "at night")
HOME = "home"

# Every word a caption can contain. The world's tokenizer knows each of them as one token.
VOCABULARY = tuple(
    sorted({w for phrase in STYLE_PHRASES.values() for w in phrase.split()} | set(CLASSES) | set(COLOURS)
           | {w for s in SETTINGS for w in s.split()} | {"a"})
)


@dataclass(frozen=True)
class Subject:
    """A personal subject: a member of ``cls`` with colours (and a pattern) that no generic scene uses."""

    name: str
    cls: str
    body: tuple
    pattern: str  # "halves": top half `body`, bottom half `second`; "spots": `second`-coloured spots on `body`
    second: tuple


SUBJECTS = {
    "cat": Subject("cat", "cat", body=(245, 150, 20), pattern="halves", second=(250, 245, 235)),
    "dog": Subject("dog", "dog", body=(235, 210, 60), pattern="spots", second=(30, 25, 25)),
}


@dataclass(frozen=True)
class Scene:
    style: str = "photo"
    cls: str = "cat"
    colour: Optional[str] = None  # a COLOURS name; None: a random one is drawn when rendering
    say_colour: bool = True  # whether the caption names `colour` (pre-training captions leave it out at times)
    setting: str = ""
    subject: Optional[str] = None  # a SUBJECTS name: render that subject instead of a generic `cls`


def caption(scene: Scene, placeholder: Optional[str] = None) -> str:
    """The scene's caption. With a subject, ``placeholder`` (e.g. "<palp-cat>") stands for it, as in y and y_P;
    without one the subject is described by its class noun, as in the clean prompt y_c."""
    if scene.subject is not None and placeholder is not None:
        noun = placeholder
    else:
        noun = "a " + (f"{scene.colour} " if scene.colour and scene.say_colour else "") + scene.cls
    words = [STYLE_PHRASES[scene.style], noun]
    if scene.setting and scene.setting != HOME:
        words.append(scene.setting)
    return " ".join(words)


def sample_scene(rng: np.random.Generator, subject: Optional[str] = None) -> Scene:
    """A random generic scene (the pre-training distribution), or a random scene of ``subject``."""
    style = STYLES[rng.integers(len(STYLES))]
    setting = SETTINGS[rng.integers(len(SETTINGS))]
    if subject is not None:
        return Scene(style=style, cls=SUBJECTS[subject].cls, setting=setting, subject=subject)
    cls = CLASSES[rng.integers(len(CLASSES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    return Scene(style=style, cls=cls, colour=colour, say_colour=bool(rng.random() < 0.7), setting=setting)


def subject_photo_scene(subject: str) -> Scene:
    """How the subject's own photos look: a photo, at home. The personalization prompt y_P describes these."""
    return Scene(style="photo", cls=SUBJECTS[subject].cls, setting=HOME, subject=subject)


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _grid():
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return yy.astype(np.float32), xx.astype(np.float32)


_YY, _XX = _grid()


def _shape_mask(cls: str, cy: float, cx: float, r: float) -> np.ndarray:
    """The silhouette of a class: a cat is a disk with two pointed ears, a dog a box with hanging ears, a toy a
    pyramid (a triangle standing on its base)."""
    if cls == "cat":
        body = (_YY - cy) ** 2 + (_XX - cx) ** 2 <= r**2
        ears = np.zeros_like(body)
        for side in (-1, 1):
            ex = cx + side * 0.55 * r
            tip = cy - 1.45 * r
            base = cy - 0.6 * r
            within = (_YY >= tip) & (_YY <= base)
            half_width = 0.35 * r * (_YY - tip) / max(base - tip, 1e-6)
            ears |= within & (np.abs(_XX - ex) <= half_width)
        return body | ears
    if cls == "dog":
        body = (np.abs(_YY - cy) <= 0.85 * r) & (np.abs(_XX - cx) <= 0.85 * r)
        ears = np.zeros_like(body)
        for side in (-1, 1):
            ex = cx + side * 1.05 * r
            ears |= (np.abs(_XX - ex) <= 0.25 * r) & (_YY >= cy - 0.85 * r) & (_YY <= cy + 0.2 * r)
        return body | ears
    if cls == "toy":
        top, bottom = cy - 1.1 * r, cy + 0.9 * r
        within = (_YY >= top) & (_YY <= bottom)
        half_width = 1.05 * r * (_YY - top) / (bottom - top)
        return within & (np.abs(_XX - cx) <= half_width)
    raise ValueError(f"unknown class {cls!r}")


def _background(setting: str, rng: np.random.Generator):
    """Colour canvas and a label map (0 background, 2 setting props) for a setting."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    labels = np.zeros((SIZE, SIZE), np.int8)
    if setting == "":
        img[:] = rng.uniform(190, 240, size=3)
    elif setting == "in paris":
        img[:] = (170, 205, 235) + rng.uniform(-10, 10, size=3)  # sky
        tx = rng.uniform(25, 28)
        # The tower: a tall thin A-frame with a crossbar, standing on the ground line.
        within = (_YY >= 4) & (_YY <= 31)
        half_width = 0.3 + 3.2 * ((_YY - 4) / 27.0) ** 2
        tower = within & (np.abs(_XX - tx) <= half_width)
        tower &= ~((_YY >= 24) & (np.abs(_XX - tx) <= half_width - 1.6))  # the arch between its legs
        tower |= (np.abs(_YY - 17) <= 0.5) & (np.abs(_XX - tx) <= 2.2)
        img[tower] = (70, 60, 55)
        labels[tower] = 2
    elif setting == "on rock":
        img[:] = rng.uniform(195, 235, size=3)
        edge = 24 + 1.5 * np.sin(_XX * rng.uniform(0.3, 0.6) + rng.uniform(0, 6.28))
        rock = _YY >= edge
        img[rock] = (125, 120, 115) + rng.uniform(-8, 8, size=3)
        labels[rock] = 2
    elif setting == "at night":
        img[:] = (20, 25, 60) + rng.uniform(-6, 6, size=3)
        my, mx = rng.uniform(4, 7), rng.uniform(23, 28)
        moon = (_YY - my) ** 2 + (_XX - mx) ** 2 <= 3.2**2
        img[moon] = (240, 235, 190)
        labels[moon] = 2
        for _ in range(4):
            sy, sx = rng.integers(1, 12), rng.integers(1, 31)
            img[sy, sx] = (230, 230, 200)
    elif setting == HOME:
        img[:] = (235, 200, 170)  # peach wall
        floor = _YY >= 23
        checker = ((_YY.astype(int) // 3 + _XX.astype(int) // 3) % 2 == 0) & floor
        img[floor] = (240, 240, 240)
        img[checker] = (150, 40, 60)
        labels[floor] = 2
    else:
        raise ValueError(f"unknown setting {setting!r}")
    return img, labels


def _paint_subject(img, labels, scene: Scene, rng: np.random.Generator):
    cy = rng.uniform(14, 17)
    cx = rng.uniform(10, 14) if scene.setting == "in paris" else rng.uniform(12, 20)
    r = rng.uniform(5.5, 7.0)
    if scene.setting in ("on rock", HOME):
        cy = min(cy, 21 - r)  # sitting on the rock / floor, not buried in it
    mask = _shape_mask(scene.cls, cy, cx, r)
    if scene.subject is None:
        colour = scene.colour or list(COLOURS)[rng.integers(len(COLOURS))]
        img[mask] = np.asarray(COLOURS[colour], np.float32) + rng.uniform(-12, 12, size=3)
    else:
        subject = SUBJECTS[scene.subject]
        img[mask] = subject.body
        if subject.pattern == "halves":
            img[mask & (_YY >= cy)] = subject.second
        elif subject.pattern == "spots":
            for dy, dx in ((-0.35, -0.3), (0.3, 0.35), (0.35, -0.45)):
                spot = (_YY - (cy + dy * r)) ** 2 + (_XX - (cx + dx * r)) ** 2 <= (0.22 * r) ** 2
                img[spot & mask] = subject.second
    labels[mask] = 1
    if scene.setting == "at night":
        img[mask] *= 0.75  # lit by the moon


def _box_blur(img, passes=2):
    for _ in range(passes):
        padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = sum(padded[dy : dy + SIZE, dx : dx + SIZE] for dy in range(3) for dx in range(3)) / 9.0
    return img


def _stylise(img, labels, style: str, setting: str, rng: np.random.Generator):
    if style == "photo":
        return img + rng.normal(0, 3, size=img.shape)
    if style == "sketch":
        # Pencil lines wherever the flat-colour scene changes colour, grey on white paper; night is cross-hatched.
        diff = np.zeros((SIZE, SIZE), bool)
        step_y = np.abs(img[1:] - img[:-1]).max(-1) > 25
        step_x = np.abs(img[:, 1:] - img[:, :-1]).max(-1) > 25
        diff[1:] |= step_y
        diff[:, 1:] |= step_x
        paper = np.full((SIZE, SIZE), 245.0)
        if setting == "at night":
            hatch = ((_YY + _XX).astype(int) % 4 == 0) & (labels == 0)
            paper[hatch] = 170
        paper[diff] = 45
        out = np.repeat(paper[..., None], 3, axis=-1)
        return out + rng.normal(0, 4, size=(SIZE, SIZE, 1))
    if style == "watercolor":
        # Pale, soft-edged washes.
        return _box_blur(0.6 * img + 0.4 * 250.0) + rng.normal(0, 2, size=img.shape)
    if style == "oil painting":
        # Saturated, posterised colour laid down in short horizontal strokes.
        grey = img.mean(-1, keepdims=True)
        out = grey + 1.35 * (img - grey)
        strokes = 1 + 0.22 * rng.standard_normal((SIZE, SIZE // 3 + 1, 1)).repeat(3, axis=1)[:, :SIZE]
        out = out * strokes
        return np.round(out / 40.0) * 40.0
    raise ValueError(f"unknown style {style!r}")


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Render ``scene`` as a (32, 32, 3) uint8 image; ``rng`` draws the layout and the unsaid details."""
    img, labels = _background(scene.setting, rng)
    _paint_subject(img, labels, scene, rng)
    img = _stylise(img, labels, scene.style, scene.setting, rng)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_dataset(n: int, seed: int = 0, subject_fraction: float = 0.0):
    """``n`` random scenes and their renders, as (list of Scene, uint8 array (n, 32, 32, 3)).

    ``subject_fraction`` of them show a random subject (for the probe); the pre-training data uses 0: the
    subjects are what the model is personalized to later, so the pre-trained model must never see them."""
    rng = np.random.default_rng(seed)
    scenes, images = [], np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        if rng.random() < subject_fraction:
            scene = sample_scene(rng, subject=list(SUBJECTS)[rng.integers(len(SUBJECTS))])
            if rng.random() < 0.25:
                scene = replace(scene, style="photo", setting=HOME)  # also what its own photos look like
        else:
            scene = sample_scene(rng)
        scenes.append(scene)
        images[i] = render(scene, rng)
    return scenes, images


# The target prompts of the demo: each names three elements (style, class, setting), none of them those of the
# subject's photos. The paper's "complex prompts" have 4+ elements; a 32×32 world holds three.
TARGET_SCENES = (
    Scene(style="sketch", setting="in paris"),
    Scene(style="watercolor", setting="at night"),
    Scene(style="oil painting", setting="on rock"),
    Scene(style="photo", setting="in paris"),
)


def target_scenes(subject: str):
    return [replace(s, cls=SUBJECTS[subject].cls, subject=subject) for s in TARGET_SCENES]
