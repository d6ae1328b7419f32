#!/usr/bin/env python
# coding=utf-8
# Copyright 2026 The PALP training scripts authors. Licensed under the Apache License, Version 2.0.
"""Draw the stand-in images of this example: three photos of a toy-like cat and one "painting" of a lone figure on
a rock above a sea of fog (after the composition of Friedrich's "Wanderer above the Sea of Fog", 1818).

They let the example run end to end on any machine (a smoke test of the pipeline, not a result worth looking at);
for a real run, point subjects.json at your own cat photos and at a reproduction of the artwork.

    python examples/art_inspiration/draw_stand_ins.py   # rewrites stand_in/cat/*.png and stand_in/artwork/*.png
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent


def draw_cat(size, background, offset, scale, seed):
    """An orange cat sitting, seen from the front: body, head, ears, eyes and a tail, on a plain background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = size / 2 + offset[0], size * 0.6 + offset[1]
    s = size * scale
    fur, dark = (226, 134, 48), (150, 80, 25)
    draw.ellipse([cx - 0.32 * s, cy - 0.15 * s, cx + 0.32 * s, cy + 0.38 * s], fill=fur)  # body
    draw.arc([cx + 0.1 * s, cy - 0.05 * s, cx + 0.55 * s, cy + 0.4 * s], 270, 90, fill=dark, width=max(2, size // 40))
    head = [cx - 0.22 * s, cy - 0.5 * s, cx + 0.22 * s, cy - 0.08 * s]
    draw.polygon(
        [(cx - 0.2 * s, cy - 0.35 * s), (cx - 0.14 * s, cy - 0.62 * s), (cx - 0.02 * s, cy - 0.45 * s)], fill=fur
    )
    draw.polygon(
        [(cx + 0.2 * s, cy - 0.35 * s), (cx + 0.14 * s, cy - 0.62 * s), (cx + 0.02 * s, cy - 0.45 * s)], fill=fur
    )
    draw.ellipse(head, fill=fur)
    for side in (-1, 1):  # stripes, eyes
        draw.line([cx + side * 0.05 * s, cy - 0.48 * s, cx + side * 0.08 * s, cy - 0.38 * s], fill=dark, width=2)
        draw.ellipse(
            [cx + side * 0.09 * s - 3, cy - 0.32 * s - 3, cx + side * 0.09 * s + 3, cy - 0.32 * s + 3],
            fill=(40, 120, 40),
        )
    draw.polygon([(cx - 3, cy - 0.22 * s), (cx + 3, cy - 0.22 * s), (cx, cy - 0.19 * s)], fill=(200, 90, 110))
    noise = rng.normal(0, 6, (size, size, 3))  # a little sensor noise, so the photos are not flat vector art
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def draw_wanderer(width, height, seed):
    """A romantic landscape: warm sky, blue-grey peaks half drowned in fog, a dark rock and a dark figure on it,
    seen from behind, all in short random brush strokes."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    sky = (1 - y) * np.array([196, 204, 214]) + y * np.array([236, 214, 176])
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for base, colour in ((0.55, (118, 128, 146)), (0.62, (146, 154, 168))):  # two ranges of peaks
        xs = np.linspace(0, width, 9)
        ys = height * (base - 0.12 * rng.random(9))
        draw.polygon([(0, height)] + list(zip(xs, ys)) + [(width, height)], fill=colour)
    for _ in range(60):  # the sea of fog: pale, soft horizontal strokes
        x, yy = rng.uniform(-20, width), rng.uniform(0.58, 0.9) * height
        shade = int(rng.uniform(215, 245))
        draw.ellipse([x, yy, x + rng.uniform(20, 60), yy + rng.uniform(4, 10)], fill=(shade, shade, shade + 5))
    rock = [
        (width * 0.18, height),
        (width * 0.3, height * 0.8),
        (width * 0.5, height * 0.74),
        (width * 0.68, height * 0.82),
        (width * 0.8, height),
    ]
    draw.polygon(rock, fill=(52, 46, 42))
    fx, fy = width * 0.5, height * 0.74  # the wanderer, from behind: coat, head, hair, stick
    draw.polygon([(fx - 7, fy), (fx + 7, fy), (fx + 5, fy - 24), (fx - 5, fy - 24)], fill=(30, 32, 36))
    draw.ellipse([fx - 4, fy - 32, fx + 4, fy - 23], fill=(70, 50, 36))
    draw.line([fx + 8, fy - 16, fx + 14, fy + 2], fill=(40, 30, 24), width=2)
    arr = np.asarray(image).copy()
    draw = ImageDraw.Draw(image)
    for _ in range(1500):  # brush texture: short strokes in the local colour, slightly jittered
        x, yy = int(rng.integers(0, width)), int(rng.integers(0, height))
        colour = tuple(int(c) for c in np.clip(arr[yy, x] + rng.normal(0, 10, 3), 0, 255))
        angle = rng.uniform(-0.4, 0.4)
        length = rng.uniform(2, 6)
        draw.line([x, yy, x + length * np.cos(angle), yy + length * np.sin(angle)], fill=colour, width=2)
    return image.filter(ImageFilter.SMOOTH)


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=str, default=str(HERE / "stand_in"), help="Where to write the images.")
    args = parser.parse_args(input_args)
    out = Path(args.output_dir)
    (out / "cat").mkdir(parents=True, exist_ok=True)
    (out / "artwork").mkdir(parents=True, exist_ok=True)
    shots = [((92, 140, 120), (0, 0), 0.8), ((210, 200, 180), (-12, 6), 0.65), ((120, 150, 90), (10, -4), 0.9)]
    for index, (background, offset, scale) in enumerate(shots):
        draw_cat(128, background, offset, scale, seed=index).save(out / "cat" / f"cat_{index}.png", optimize=True)
    draw_wanderer(128, 160, seed=1818).save(out / "artwork" / "wanderer_stand_in.png", optimize=True)
    print(f"Wrote the stand-in images to {out}")


if __name__ == "__main__":
    main()
