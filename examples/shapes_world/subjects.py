"""Write the personal subjects of the shapes world: their training photos and target prompts.

Each subject is a member of a known class in an appearance the pre-trained model has never seen (a checkered star,
a ringed circle, an orange square, a checkered triangle), photographed 5 times in ONE context: "a photo of" it on a
grey background, by day, alone. Its target prompts change that context (sketch style, other backgrounds, a companion
object, night) while asking for the subject.

    python examples/shapes_world/subjects.py --output_dir examples/shapes_world/subjects
    python examples/shapes_world/subjects.py --split heldout --output_dir examples/shapes_world/subjects_heldout
    python examples/shapes_world/subjects.py --split heldout_v2 --output_dir examples/shapes_world/subjects_heldout_v2

writes ``<output_dir>/<subject>/<subject>_<i>.png`` and ``<output_dir>/subjects.json`` (token, class, identity and
the (target, clean) prompt pairs of every subject). ``--split dev`` (the default) is the development split every
default was tuned on; ``--split heldout`` and ``--split heldout_v2`` the subjects and prompts kept for the final
checks (PROTOCOL.md).
"""

import argparse
import json
from pathlib import Path

import world

HERE = Path(__file__).resolve().parent


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Write the shapes-world subjects and their target prompts.")
    parser.add_argument("--output_dir", type=str, default=str(HERE / "subjects"), help="Where the subjects go.")
    parser.add_argument("--num_images", type=int, default=5, help="Training photos per subject (3–6 is typical).")
    parser.add_argument("--seed", type=int, default=None,
                        help="Seed of the photos' poses (default: 0 for dev, 100 for heldout, 200 for heldout_v2).")
    parser.add_argument("--split", type=str, default="dev", choices=list(world.SPLITS), help="Which subjects.")
    return parser.parse_args(input_args)


def subject_table(split="dev"):
    """Everything a training or evaluation script needs to know about the subjects of a split."""
    table = {}
    for name, subject in world.SPLITS[split][0].items():
        table[name] = {
            "token": subject["token"],
            "class_name": subject["shape"],
            "identity": {k: subject[k] for k in ("shape", "colour", "pattern")},
            "training_context": "a photo of it on a grey background, by day, alone",
            "personalization_prompt": "a photo of {token}",
            "prompts": [{"target": t, "clean": c} for t, c in world.target_prompts(name)],
        }
    return table


def main(args):
    out = Path(args.output_dir)
    subjects = world.SPLITS[args.split][0]
    seed = args.seed if args.seed is not None else {"dev": 0, "heldout": 100, "heldout_v2": 200}[args.split]
    for i, name in enumerate(subjects):
        world.write_subject_images(name, out / name, n=args.num_images, seed=seed + i)
    (out / "subjects.json").write_text(json.dumps(subject_table(args.split), indent=1))
    print(f"wrote {len(subjects)} subjects to {out}")


if __name__ == "__main__":
    main(parse_args())
