"""The shapes world: a procedural renderer of small RGB scenes, their captions and ground-truth attributes.

A scene is one main object (a shape with a colour and a fill pattern) on a coloured background, drawn in a style
("a photo of" = filled, shaded, with a drop shadow; "a sketch of" = an outline drawing on tinted paper), with two
optional context elements: a small white companion shape in the lower-right corner and night (a darkened, blue-tinted
scene with a moon). Captions follow the grammar of Stable Diffusion prompts:

    "a sketch of a red striped star on a blue background with a small circle at night"

Some words of the world are never used in captions and never rendered for pre-training: the colour ``orange`` and the
patterns ``checkered`` and ``ringed``. They exist so that personal subjects can be members of a known class in an
appearance the pre-trained model has never seen (as a particular cat is a member of "cat"), while the probe, which is
trained on every rendered attribute, can still recognise them.

Everything here is numpy + PIL and deterministic given a ``numpy.random.Generator``.
"""

import hashlib
import math

import numpy as np
from PIL import Image, ImageDraw

STYLES = ("photo", "sketch")
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
PATTERNS = ("plain", "striped", "dotted", "checkered", "ringed")
BACKGROUNDS = ("grey", "white", "blue", "green", "yellow")
COMPANIONS = ("none",) + SHAPES
# Appearances reserved for personal subjects: never captioned, never rendered for pre-training.
HIDDEN_COLOURS = ("orange",)
HIDDEN_PATTERNS = ("checkered", "ringed")
CAPTION_COLOURS = tuple(c for c in COLOURS if c not in HIDDEN_COLOURS)
CAPTION_PATTERNS = tuple(p for p in PATTERNS if p not in HIDDEN_PATTERNS)

# The attributes a probe predicts, each with its classes (the order of a probe head's logits).
ATTRIBUTES = {
    "style": STYLES,
    "shape": SHAPES,
    "colour": COLOURS,
    "pattern": PATTERNS,
    "background": BACKGROUNDS,
    "companion": COMPANIONS,
    "night": ("day", "night"),
}

OBJECT_RGB = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 70, 215),
    "yellow": (240, 205, 20),
    "purple": (140, 45, 185),
    "orange": (250, 125, 10),
}
BACKGROUND_RGB = {
    "grey": (128, 128, 128),
    "white": (238, 238, 238),
    "blue": (125, 170, 240),
    "green": (120, 205, 130),
    "yellow": (245, 228, 140),
}
PAPER_RGB = np.array((246, 241, 228), dtype=np.float32)
COMPANION_RGB = np.array((250, 250, 250), dtype=np.float32)
SUPERSAMPLE = 4

# Every word a caption or a target prompt of this world can contain; the tokenizer makes each one a single token.
VOCABULARY = tuple(
    dict.fromkeys(
        "a an the of photo sketch on background with small at night day".split()
        + list(SHAPES)
        + list(COLOURS)
        + [p for p in PATTERNS if p != "plain"]
        + list(BACKGROUNDS)
    )
)


def random_scene(rng, style=None, shape=None, colour=None, pattern=None, background=None, companion=None,
                 night=None, hidden=False):
    """Draw a scene's attributes; any attribute given is kept. ``hidden`` allows the subjects-only appearances."""
    colours = COLOURS if hidden else CAPTION_COLOURS
    patterns = PATTERNS if hidden else CAPTION_PATTERNS
    scene = {
        "style": style or STYLES[rng.integers(len(STYLES))],
        "shape": shape or SHAPES[rng.integers(len(SHAPES))],
        "colour": colour or colours[rng.integers(len(colours))],
        "pattern": pattern or patterns[rng.integers(len(patterns))],
        "companion": companion or ("none" if rng.random() < 0.6 else SHAPES[rng.integers(len(SHAPES))]),
        "night": bool(rng.random() < 0.3) if night is None else bool(night),
    }
    if background is None:
        # A background of the object's own colour name would hide it; those pairs do not occur.
        choices = [b for b in BACKGROUNDS if b != scene["colour"]]
        background = choices[rng.integers(len(choices))]
    scene["background"] = background
    scene.update(random_pose(rng, scene["companion"] != "none"))
    return scene


def random_pose(rng, has_companion):
    """Position, size and rotation of the main object (in pixels of a 32×32 image)."""
    centre = 13.5 if has_companion else 16.0
    return {
        "cx": float(centre + rng.uniform(-1.5, 1.5)),
        "cy": float(centre + rng.uniform(-1.5, 1.5)),
        "radius": float(rng.uniform(8.0, 10.0)),
        "angle": float(rng.uniform(-15.0, 15.0)),
    }


def caption(scene, rng=None, p_drop_colour=0.0, p_drop_pattern=0.0, p_drop_background=0.0):
    """The scene's caption. With ``rng``, colour/pattern/background words are dropped with the given probabilities,
    so the model also learns what "a star" means without them (a clean target prompt names only the class)."""
    def keep(p):
        return rng is None or rng.random() >= p

    words = [f"a {scene['style']} of a"]
    if keep(p_drop_colour):
        words.append(scene["colour"])
    if scene["pattern"] != "plain" and keep(p_drop_pattern):
        words.append(scene["pattern"])
    words.append(scene["shape"])
    if keep(p_drop_background):
        words.append(f"on a {scene['background']} background")
    if scene["companion"] != "none":
        words.append(f"with a small {scene['companion']}")
    if scene["night"]:
        words.append("at night")
    return " ".join(words)


def parse_caption(text):
    """The attributes a caption or clean prompt asks for (only those it names), e.g. {"style": "sketch", ...}.

    Night is an element only when asked for; a prompt without "at night" does not ask for day."""
    words = text.lower().replace(",", " ").split()
    found = {}
    for i, word in enumerate(words):
        if word in STYLES and i + 1 < len(words) and words[i + 1] == "of" and "style" not in found:
            found["style"] = word
        elif word in SHAPES:
            if i > 0 and words[i - 1] == "small":
                found["companion"] = word
            elif "shape" not in found:
                found["shape"] = word
        elif word in COLOURS and i + 1 < len(words) and words[i + 1] != "background" and "colour" not in found:
            found["colour"] = word
        elif word in PATTERNS:
            found["pattern"] = word
        elif word in BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background":
            found["background"] = word
        elif word == "night" and i > 0 and words[i - 1] == "at":
            found["night"] = "night"
    return found


def scene_labels(scene):
    """The probe's targets for a scene: one class index per attribute."""
    values = dict(scene)
    values["night"] = "night" if scene["night"] else "day"
    return {name: ATTRIBUTES[name].index(values[name]) for name in ATTRIBUTES}


def scene_key(scene):
    """The scene's attribute tuple, without pose."""
    return tuple(str(scene[k]) for k in ("style", "shape", "colour", "pattern", "background", "companion", "night"))


def is_held_out(scene, fraction=0.1):
    """A fixed ~10% of attribute combinations never used for pre-training (to test the base model on captions it
    has never seen). Decided by a hash, so every script agrees without sharing a list."""
    digest = hashlib.sha256("|".join(scene_key(scene)).encode()).digest()
    return digest[0] < int(256 * fraction)


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _polygon(shape, cx, cy, r, angle):
    a0 = math.radians(angle)
    if shape == "square":
        pts = [(r * 0.82 * math.sqrt(2), a0 + math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        pts = [(r * 1.05, a0 - math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        pts = [(r * (1.1 if k % 2 == 0 else 0.48), a0 - math.pi / 2 + k * math.pi / 5) for k in range(10)]
    else:
        raise ValueError(shape)
    # Triangles sit a little low so their visual centre is the pose centre.
    dy = r * 0.2 if shape == "triangle" else 0.0
    return [(cx + rad * math.cos(th), cy + dy + rad * math.sin(th)) for rad, th in pts]


def shape_mask(shape, cx, cy, r, angle, size):
    """A float mask in [0, 1] of the shape at ``SUPERSAMPLE``× resolution (coordinates in output pixels)."""
    s = SUPERSAMPLE
    big = size * s
    if shape == "circle":
        yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / s
        return ((xx + 0.5 / s - cx) ** 2 + (yy + 0.5 / s - cy) ** 2 <= r * r).astype(np.float32)
    img = Image.new("L", (big, big), 0)
    ImageDraw.Draw(img).polygon([(x * s, y * s) for x, y in _polygon(shape, cx, cy, r, angle)], fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


def pattern_mask(pattern, cx, cy, r, angle, size):
    """1 where the object's colour shows, 0 where the pattern's white shows (supersampled, object frame)."""
    s = SUPERSAMPLE
    big = size * s
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / s
    a = math.radians(angle)
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    period = max(4.0, r * 0.55)
    if pattern == "plain":
        return np.ones_like(xx)
    if pattern == "striped":
        return (np.mod(v + period / 4, period) < period / 2).astype(np.float32)
    if pattern == "dotted":
        du = np.mod(u + period / 2, period) - period / 2
        dv = np.mod(v + period / 2, period) - period / 2
        return (du ** 2 + dv ** 2 > (period * 0.28) ** 2).astype(np.float32)
    if pattern == "checkered":
        return ((np.floor(u / (period * 0.75)) + np.floor(v / (period * 0.75))) % 2 == 0).astype(np.float32)
    if pattern == "ringed":
        return (np.mod(np.sqrt(u ** 2 + v ** 2), period) < period / 2).astype(np.float32)
    raise ValueError(pattern)


def _outline(mask, width):
    """The band of ``mask`` within ``width`` supersampled pixels of its edge (a morphological gradient)."""
    img = Image.fromarray((mask * 255).astype(np.uint8))
    from PIL import ImageFilter

    eroded = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1)), dtype=np.float32) / 255.0
    return np.clip(mask - eroded, 0.0, 1.0)


def _moon(size):
    s = SUPERSAMPLE
    big = size * s
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / s
    cx, cy, r = size * 0.83, size * 0.16, size * 0.1
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    bite = (xx - cx - r * 0.55) ** 2 + (yy - cy + r * 0.3) ** 2 <= (r * 0.85) ** 2
    return (disc & ~bite).astype(np.float32)


def render(scene, size=32):
    """Render ``scene`` to a ``size``×``size`` RGB ``PIL.Image`` (drawn supersampled, then box-filtered)."""
    scale = size / 32.0
    cx, cy, r, angle = scene["cx"] * scale, scene["cy"] * scale, scene["radius"] * scale, scene["angle"]
    s = SUPERSAMPLE
    big = size * s
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / (big - 1)
    colour = np.array(OBJECT_RGB[scene["colour"]], dtype=np.float32)
    bg = np.array(BACKGROUND_RGB[scene["background"]], dtype=np.float32)
    mask = shape_mask(scene["shape"], cx, cy, r, angle, size)[..., None]
    pat = pattern_mask(scene["pattern"], cx, cy, r, angle, size)[..., None]
    has_companion = scene["companion"] != "none"
    if has_companion:
        ccx, ccy, cr = size * 0.8, size * 0.8, size * 0.14
        cmask = shape_mask(scene["companion"], ccx, ccy, cr, 0.0, size)[..., None]

    if scene["style"] == "photo":
        # Background with a soft vertical light falloff; object shaded from the top-left, with a drop shadow.
        canvas = bg * (1.06 - 0.12 * yy[..., None])
        shadow = shape_mask(scene["shape"], cx + 1.2 * scale, cy + 1.5 * scale, r, angle, size)[..., None]
        canvas = canvas * (1 - 0.35 * shadow)
        light = (1.18 - 0.4 * (xx + yy)[..., None] / 2) + 0.0
        fill = (pat * colour + (1 - pat) * np.array((250, 250, 250), dtype=np.float32)) * light
        canvas = canvas * (1 - mask) + fill * mask
        if has_companion:
            cshadow = shape_mask(scene["companion"], ccx + 0.8 * scale, ccy + 1.0 * scale, cr, 0.0, size)[..., None]
            canvas = canvas * (1 - 0.35 * cshadow)
            canvas = canvas * (1 - cmask) + COMPANION_RGB * light * cmask
    else:
        # Sketch: tinted paper, a dark-coloured outline, the pattern as a light wash of the colour.
        paper = 0.45 * bg + 0.55 * PAPER_RGB
        canvas = np.broadcast_to(paper, (big, big, 3)).copy()
        wash = 0.55 * colour + 0.45 * PAPER_RGB
        canvas = canvas * (1 - mask * pat) + wash * (mask * pat)
        line = _outline(mask[..., 0], width=max(1, int(1.4 * s * scale)))[..., None]
        canvas = canvas * (1 - line) + 0.7 * colour * line
        if has_companion:
            cline = _outline(cmask[..., 0], width=max(1, int(1.2 * s * scale)))[..., None]
            canvas = canvas * (1 - cmask) + paper * cmask
            canvas = canvas * (1 - cline) + np.array((60, 60, 60), dtype=np.float32) * cline

    if scene["night"]:
        canvas = canvas * 0.42 + np.array((5, 10, 45), dtype=np.float32)
        moon = _moon(size)[..., None]
        canvas = canvas * (1 - moon) + np.array((250, 240, 170), dtype=np.float32) * moon

    canvas = np.clip(canvas, 0, 255).astype(np.uint8)
    return Image.fromarray(canvas).resize((size, size), Image.BOX)


# ----------------------------------------------------------------------------------------------------------------
# Personal subjects


# Each subject is a member of a known class in an appearance the pre-trained model never saw (an unseen pattern or
# an unseen colour). Its photos share ONE context: a photo on a grey background, by day, alone.
SUBJECTS = {
    "checkered_star": {"token": "<checkered-star>", "shape": "star", "colour": "yellow", "pattern": "checkered"},
    "ringed_circle": {"token": "<ringed-circle>", "shape": "circle", "colour": "red", "pattern": "ringed"},
    "orange_square": {"token": "<orange-square>", "shape": "square", "colour": "orange", "pattern": "striped"},
    "checkered_triangle": {"token": "<checkered-triangle>", "shape": "triangle", "colour": "blue",
                           "pattern": "checkered"},
}
SUBJECT_CONTEXT = {"style": "photo", "background": "grey", "companion": "none", "night": False}

# Target prompts that change the context while asking for the subject. ``{}`` is the subject: the placeholder
# token in the target prompt, "a <shape>" in the clean prompt.
TARGET_TEMPLATES = (
    "a sketch of {} on a {blue} background",
    "a photo of {} on a {yellow} background at night",
    "a photo of {} on a {green} background with a small {companion}",
    "a sketch of {} with a small {companion} at night",
    "a photo of {} on a {white} background with a small {companion} at night",
    "a sketch of {} on a {green} background",
)


# The held-out split, frozen before any tuning result on it was looked at (PROTOCOL.md): subjects and target prompts
# that no default of the project was chosen on. The shipped SUBJECTS × TARGET_TEMPLATES are the development split.
# Two held-out subjects lie inside the base model's support (an attribute combination it was never trained on, but of
# colours and patterns it knows: `is_held_out` holds their training context out of pre-training), two outside it (an
# unseen pattern, an unseen colour), as the development subjects are.
HELDOUT_SUBJECTS = {
    "dotted_star": {"token": "<dotted-star>", "shape": "star", "colour": "purple", "pattern": "dotted"},
    "striped_triangle": {"token": "<striped-triangle>", "shape": "triangle", "colour": "green", "pattern": "striped"},
    "ringed_square": {"token": "<ringed-square>", "shape": "square", "colour": "blue", "pattern": "ringed"},
    "orange_circle": {"token": "<orange-circle>", "shape": "circle", "colour": "orange", "pattern": "dotted"},
}
HELDOUT_TEMPLATES = (
    "a sketch of {} on a {yellow} background",
    "a photo of {} on a {blue} background at night",
    "a sketch of {} on a {white} background with a small {companion}",
    "a photo of {} on a {green} background at night",
    "a sketch of {} on a {blue} background with a small {companion} at night",
    "a photo of {} on a {yellow} background with a small {companion}",
)
# The second held-out split, v2 (PROTOCOL.md, "Held-out split v2"), frozen in the commit that added it, before any
# run on it: v1 has been looked at twice. Six subjects, four of them outside the base model's support (a pattern or a
# colour it never saw), two inside it (a combination `is_held_out` keeps out of pre-training in the training
# context), none of them a subject of dev or v1; six templates found in neither dev nor v1.
HELDOUT_V2_SUBJECTS = {
    "green_circle": {"token": "<green-circle>", "shape": "circle", "colour": "green", "pattern": "dotted"},
    "blue_triangle": {"token": "<blue-triangle>", "shape": "triangle", "colour": "blue", "pattern": "striped"},
    "purple_star": {"token": "<purple-star>", "shape": "star", "colour": "purple", "pattern": "ringed"},
    "red_square": {"token": "<red-square>", "shape": "square", "colour": "red", "pattern": "checkered"},
    "orange_triangle": {"token": "<orange-triangle>", "shape": "triangle", "colour": "orange", "pattern": "plain"},
    "yellow_circle": {"token": "<yellow-circle>", "shape": "circle", "colour": "yellow", "pattern": "ringed"},
}
HELDOUT_V2_TEMPLATES = (
    "a sketch of {} on a {white} background",
    "a photo of {} on a {white} background at night",
    "a sketch of {} on a {green} background with a small {companion}",
    "a photo of {} on a {blue} background with a small {companion}",
    "a sketch of {} on a {yellow} background at night",
    "a photo of {} with a small {companion} at night",
)
SPLITS = {
    "dev": (SUBJECTS, TARGET_TEMPLATES),
    "heldout": (HELDOUT_SUBJECTS, HELDOUT_TEMPLATES),
    "heldout_v2": (HELDOUT_V2_SUBJECTS, HELDOUT_V2_TEMPLATES),
}


def find_subject(name):
    """A subject of either split, by name."""
    for subjects, _ in SPLITS.values():
        if name in subjects:
            return subjects[name]
    raise KeyError(f"{name!r} is not a shapes-world subject")


def split_of(name):
    return next(split for split, (subjects, _) in SPLITS.items() if name in subjects)


def companion_for(shape):
    """A companion of a different class than the subject, so the two are not confused."""
    return "circle" if shape != "circle" else "square"


def background_for(background, colour):
    """The background a template asks for, unless it has the subject's colour (such scenes never occur)."""
    return background if background != colour else "white"


def subject_scene(name, rng, **context):
    """A scene with the subject ``name`` in ``context`` (default: its training context), at a random pose."""
    subject = find_subject(name)
    ctx = dict(SUBJECT_CONTEXT, **context)
    return random_scene(rng, shape=subject["shape"], colour=subject["colour"], pattern=subject["pattern"],
                        hidden=True, **ctx)


def write_subject_images(name, folder, n=5, seed=0, size=32):
    """Write ``n`` training photos of subject ``name`` to ``folder`` (all in the one training context)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{name}_{i}.png"
        render(subject_scene(name, rng), size=size).save(path)
        paths.append(path)
    return paths


def target_prompts(name):
    """(target prompt, clean prompt) pairs for subject ``name``: its split's templates."""
    subject = find_subject(name)
    fill = {b: background_for(b, subject["colour"]) for b in ("blue", "yellow", "green", "white")}
    fill["companion"] = companion_for(subject["shape"])
    pairs = []
    for template in SPLITS[split_of(name)][1]:
        target = template.format(subject["token"], **fill)
        clean = template.format(f"a {subject['shape']}", **fill)
        pairs.append((target, clean))
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _bytes_to_unicode():
    """The byte → printable-unicode table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _clip_tokenizer(order, model_max_length):
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in order:
        # Left-to-right merges build the word one character at a time; the last piece carries "</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = (current, piece)
            if merge not in merges:
                merges.append(merge)
            current = current + piece
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_tokenizer(words=VOCABULARY, model_max_length=32):
    """A real byte-level BPE ``CLIPTokenizer`` whose merges make every word of the world a single token.

    Words outside the vocabulary (a placeholder such as ``<checkered-star>`` before it is added) fall back to
    byte pieces, exactly as with the real CLIP tokenizer."""
    order = list(words)
    for _ in range(len(order) + 1):
        tokenizer = _clip_tokenizer(order, model_max_length)
        split = [w for w in order if len(tokenizer.tokenize(w)) != 1]
        if not split:
            return tokenizer
        # BPE applies the lowest-ranked merge first, so "tr" of "triangle" can cut "striped" into "s|tri|...":
        # moving a split word's merges to the front gives them priority.
        order = split + [w for w in order if w not in split]
    raise ValueError(f"cannot make these words single tokens: {split}")


def main(input_args=None):
    """Draw a grid of random pre-training scenes and the subjects' photos, and print the scenes' captions."""
    import argparse

    parser = argparse.ArgumentParser(description="Render a sample grid of the shapes world.")
    parser.add_argument("--output", type=str, default="world_samples.png", help="Where the grid PNG goes.")
    parser.add_argument("--num_scenes", type=int, default=24, help="Random pre-training scenes (rows of 8).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenes.")
    parser.add_argument("--scale", type=int, default=3, help="Upscaling of the 32×32 images.")
    args = parser.parse_args(input_args)
    rng = np.random.default_rng(args.seed)
    scenes = [random_scene(rng) for _ in range(args.num_scenes)]
    images = [render(s) for s in scenes]
    for name in SUBJECTS:
        images += [render(subject_scene(name, rng)) for _ in range(2)]
    cols, cell = 8, 32 * args.scale
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.resize((cell, cell), Image.NEAREST), ((i % cols) * cell, (i // cols) * cell))
    grid.save(args.output)
    for i, scene in enumerate(scenes):
        print(f"{i:2d}: {caption(scene)}")


if __name__ == "__main__":
    main()
