"""The paper's ablation (Table 2 / Fig. 6), reproduced on the shapes world.

For every subject × target prompt × variant, train_palp.py personalizes the shipped base model (same seed and
settings for every variant, only the alignment flags change), the result is sampled ``--num_samples`` times with fixed
seeds, and the probe scores prompt alignment and subject fidelity (definitions in README.md). Variants:

| variant | train_palp.py flags |
|---|---|
| TI+DB | ``--alignment_mode none`` (Textual Inversion + DreamBooth-LoRA) |
| SDS | ``--alignment_mode sds`` (pre-trained score minus the noise) |
| PALP, fresh noise, no rescale | ``--alignment_noise fresh --no-rescale`` |
| PALP, same noise, no rescale | ``--alignment_noise same --no-rescale`` |
| PALP, fresh noise | ``--alignment_noise fresh`` (rescale on) |
| PALP (default) | same noise, rescale on: the paper's final method |

The first five rows of the paper's ladder are TI+DB < SDS < fresh noise < same noise < same noise + rescale; "PALP,
fresh noise" (with the rescale) completes the 2×2 of noise × rescale. Two reference rows need no training: the base
model on the clean prompt (follows the prompt, cannot know the subject) and the subject's training photos scored
against each clean prompt (a perfect copy of the photos).

Writes ``runs.csv`` (one line per run), ``table.md`` / ``table.csv`` (per variant: mean ± standard error over
subject × prompt), ``plot.png`` (prompt alignment against subject fidelity) and one sample grid per subject:

    python examples/shapes_world/ablation.py --output_dir runs/shapes_ablation

Finished runs are skipped, so an interrupted ablation resumes where it stopped.
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import evaluate
import numpy as np
import probe as probe_lib
import torch
import world

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

VARIANTS = {
    "TI+DB": ["--alignment_mode", "none"],
    "SDS": ["--alignment_mode", "sds"],
    "PALP, fresh noise, no rescale": ["--alignment_mode", "dds", "--alignment_noise", "fresh", "--no-rescale"],
    "PALP, same noise, no rescale": ["--alignment_mode", "dds", "--alignment_noise", "same", "--no-rescale"],
    "PALP, fresh noise": ["--alignment_mode", "dds", "--alignment_noise", "fresh"],
    "PALP (default)": ["--alignment_mode", "dds"],
}


def slug(text):
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Reproduce PALP's ablation on the shapes world.")
    parser.add_argument("--model", type=str, default=str(HERE / "model"), help="The shapes-world base model.")
    parser.add_argument("--subjects_dir", type=str, default=str(HERE / "subjects"), help="Subject photos folder.")
    parser.add_argument("--probe", type=str, default=str(probe_lib.DEFAULT_PROBE), help="The probe folder.")
    parser.add_argument("--output_dir", type=str, default="runs/shapes_ablation", help="Runs, table and plot.")
    parser.add_argument("--subjects", type=str, nargs="+", default=list(world.SUBJECTS),
                        choices=list(world.SUBJECTS), help="Subjects to personalize.")
    parser.add_argument("--prompt_indices", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5],
                        help="Which of each subject's target prompts (indices into world.TARGET_TEMPLATES).")
    parser.add_argument("--variants", type=str, nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="Variants to run.")
    parser.add_argument("--max_train_steps", type=int, default=100, help="train_palp.py steps per run.")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="train_palp.py learning rate.")
    parser.add_argument("--train_batch_size", type=int, default=4, help="train_palp.py batch size.")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    parser.add_argument("--guidance_scale_pretrained", type=float, default=15.0, help="α (paper: 15).")
    parser.add_argument("--guidance_scale_personalized", type=float, default=7.5, help="β (paper: 7.5).")
    parser.add_argument("--extra_train_args", type=str, nargs=argparse.REMAINDER, default=[],
                        help="More train_palp.py flags, passed to every run (must come last).")
    parser.add_argument("--train_seed", type=int, default=0, help="train_palp.py --seed of every run.")
    parser.add_argument("--num_samples", type=int, default=8, help="Samples per run.")
    parser.add_argument("--sample_seed", type=int, default=100, help="Seed of the first sample.")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="CFG scale of sampling.")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="DPM-Solver++ sampling steps.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--shard", type=str, default="all",
                        help="Name of this process's share of the runs (runs_<shard>.csv); run several shards with "
                        "different --subjects side by side, then --summarise_only.")
    parser.add_argument("--summarise_only", action="store_true",
                        help="Only merge every runs_*.csv in --output_dir into table.md / table.csv / plot.png.")
    return parser.parse_args(input_args)


def train_command(args, subject_name, target, out):
    subject = world.SUBJECTS[subject_name]
    return [
        "--pretrained_model_name_or_path", args.model,
        "--instance_data_dir", str(Path(args.subjects_dir) / subject_name),
        "--placeholder_token", subject["token"],
        "--class_name", subject["shape"],
        "--target_prompt", target,
        "--personalization_prompt", "a photo of {token}",
        "--resolution", "32",
        "--max_train_steps", str(args.max_train_steps),
        "--learning_rate", str(args.learning_rate),
        "--train_batch_size", str(args.train_batch_size),
        "--rank", str(args.rank),
        "--guidance_scale_pretrained", str(args.guidance_scale_pretrained),
        "--guidance_scale_personalized", str(args.guidance_scale_personalized),
        # The paper's ladder, as the paper runs it: D unnormalised (train_palp.py's own default normalises it).
        "--alignment_normalization", "none",
        "--alignment_weight", "1",  # the paper's loss, and one token vector, as the paper has it
        "--num_vectors", "1",
        "--seed", str(args.train_seed),
        "--num_validation_images", "0",
        "--report_to", "none",
        "--checkpointing_steps", "1000000",
        "--output_dir", str(out),
        "--overwrite_output_dir",
    ]


def train_run(train_palp, command):
    """One train_palp.py run, in this process (the script's own ``cli``; saves ~10 s of imports per run)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    try:
        train_palp.cli(command)
    finally:
        # Each run builds its own Accelerator; accelerate keeps its state in process-wide singletons.
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def score_run(args, probe, out, subject_name, target, clean):
    pipe = evaluate.load_personalized(args.model, out)
    images = evaluate.sample(pipe, target, args.num_samples, args.sample_seed, args.guidance_scale,
                             args.num_inference_steps)
    identity = {k: world.SUBJECTS[subject_name][k] for k in probe_lib.IDENTITY}
    return images, evaluate.score(probe_lib.classify(probe, images), clean, identity)


def reference_rows(args, probe, base, subject_name, clean):
    """The base model on the clean prompt, and the training photos themselves, scored against the clean prompt."""
    from PIL import Image

    identity = {k: world.SUBJECTS[subject_name][k] for k in probe_lib.IDENTITY}
    images = evaluate.sample(base, clean, args.num_samples, args.sample_seed, args.guidance_scale,
                             args.num_inference_steps)
    photos = [Image.open(p).convert("RGB") for p in sorted((Path(args.subjects_dir) / subject_name).glob("*.png"))]
    return (
        (images, evaluate.score(probe_lib.classify(probe, images), clean, identity)),
        (np.stack([np.asarray(p) for p in photos]), evaluate.score(probe_lib.classify(probe, photos), clean, identity)),
    )


def summarise(rows, order):
    """Per variant: mean and standard error over runs of each metric."""
    table = []
    for variant in order:
        sel = [r for r in rows if r["variant"] == variant]
        if not sel:
            continue
        entry = {"variant": variant, "runs": len(sel)}
        for metric in ("prompt_alignment", "subject_fidelity", "identity_exact"):
            values = np.array([r[metric] for r in sel])
            entry[metric] = float(values.mean())
            entry[metric + "_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        for element in ("style", "background", "companion", "night"):
            values = [r[f"el_{element}"] for r in sel if r.get(f"el_{element}") not in (None, "")]
            entry[f"{element}_hit"] = float(np.mean(values)) if values else float("nan")
        table.append(entry)
    return table


def write_table(table, out, settings):
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = [
        "| variant | runs | prompt alignment ↑ | subject fidelity ↑ | identity exact ↑ | style | background | "
        "companion | night |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['variant']} | {e['runs']} | {e['prompt_alignment']:.3f} ± {e['prompt_alignment_se']:.3f} | "
            f"{e['subject_fidelity']:.3f} ± {e['subject_fidelity_se']:.3f} | "
            f"{e['identity_exact']:.3f} ± {e['identity_exact_se']:.3f} | "
            + " | ".join("–" if np.isnan(e[f"{k}_hit"]) else f"{e[f'{k}_hit']:.2f}"
                         for k in ("style", "background", "companion", "night"))
            + " |"
        )
    lines.append("")
    lines.append("Mean ± standard error over subject × prompt runs; each run scored on "
                 f"{settings['num_samples']} samples. Element columns: fraction of samples showing that element of "
                 "the clean prompt (over the prompts that name it).")
    lines.append("")
    lines.append("Settings: `" + json.dumps(settings) + "`")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot(table, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    markers = "osD^v<>Pp*"
    for i, e in enumerate(table):
        ax.errorbar(e["subject_fidelity"], e["prompt_alignment"], xerr=e["subject_fidelity_se"],
                    yerr=e["prompt_alignment_se"], fmt=markers[i % len(markers)], capsize=3, label=e["variant"])
    ax.set_xlabel("subject fidelity (probe: class, colour, pattern of the subject)")
    ax.set_ylabel("prompt alignment (probe: elements of the clean prompt)")
    ax.set_title("Shapes world: PALP ablation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=120)
    plt.close(fig)


def main(args):
    torch.set_num_threads(args.num_threads)
    sys.path.insert(0, str(REPO))
    import train_palp

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarise_only:
        summarise_shards(args, out)
        return
    probe = probe_lib.load_probe(args.probe)
    base = probe_lib.load_pipeline(args.model)
    rows, grids = [], {}
    runs_csv = out / f"runs_{args.shard}.csv"
    done = {}
    if runs_csv.exists():
        with open(runs_csv) as f:
            for r in csv.DictReader(f):
                done[(r["variant"], r["subject"], r["prompt"])] = r
    start = time.time()
    for subject_name in args.subjects:
        pairs = world.target_prompts(subject_name)
        for index in args.prompt_indices:
            target, clean = pairs[index]
            (base_images, base_scores), (photo_images, photo_scores) = reference_rows(args, probe, base, subject_name,
                                                                                    clean)
            entries = [("base model, clean prompt", base_images, base_scores, 0.0),
                       ("training photos (copy)", photo_images, photo_scores, 0.0)]
            for variant in args.variants:
                key = (variant, subject_name, target)
                run_dir = out / "runs" / subject_name / f"prompt{index}" / slug(variant)
                if key in done and (run_dir / "pytorch_lora_weights.safetensors").exists():
                    images, scores = score_run(args, probe, run_dir, subject_name, target, clean)
                    entries.append((variant, images, scores, float(done[key]["train_seconds"])))
                    continue
                t0 = time.time()
                train_run(train_palp, train_command(args, subject_name, target, run_dir) + VARIANTS[variant]
                          + list(args.extra_train_args))
                seconds = time.time() - t0
                images, scores = score_run(args, probe, run_dir, subject_name, target, clean)
                entries.append((variant, images, scores, seconds))
                print(f"[{(time.time() - start) / 60:.1f} min] {subject_name} p{index} {variant}: align "
                      f"{scores['prompt_alignment']:.3f} fidelity {scores['subject_fidelity']:.3f} "
                      f"({seconds:.0f}s)", flush=True)
            for variant, images, scores, seconds in entries:
                row = {"variant": variant, "subject": subject_name, "prompt_index": index, "prompt": target,
                       "clean_prompt": clean, "prompt_alignment": scores["prompt_alignment"],
                       "subject_fidelity": scores["subject_fidelity"], "identity_exact": scores["identity_exact"],
                       "train_seconds": round(seconds, 1)}
                for element in ("style", "background", "companion", "night"):
                    row[f"el_{element}"] = scores["elements"].get(element, "")
                rows.append(row)
                grids.setdefault((subject_name, index), []).append((variant, target, images, scores))
            write_runs(rows, runs_csv)
            evaluate.draw_grid(grids[(subject_name, index)], out / f"grid_{subject_name}_prompt{index}.png")

    summarise_shards(args, out)


def summarise_shards(args, out):
    """Merge every shard's runs into the table and the plot."""
    rows = []
    for path in sorted(out.glob("runs_*.csv")):
        with open(path) as f:
            for r in csv.DictReader(f):
                for k in ("prompt_alignment", "subject_fidelity", "identity_exact"):
                    r[k] = float(r[k])
                for element in ("style", "background", "companion", "night"):
                    key = f"el_{element}"
                    r[key] = float(r[key]) if r.get(key) not in (None, "") else ""
                rows.append(r)
    # Every shard scores the two reference rows of its prompts; count each once.
    unique = {}
    for r in rows:
        unique.setdefault((r["variant"], r["subject"], r["prompt"]), r)
    rows = list(unique.values())
    order = ["base model, clean prompt", "training photos (copy)"] + list(VARIANTS)
    table = summarise(rows, order)
    settings = {k: getattr(args, k) for k in ("max_train_steps", "learning_rate", "train_batch_size", "rank",
                                               "guidance_scale_pretrained", "guidance_scale_personalized",
                                               "train_seed", "num_samples", "sample_seed", "guidance_scale",
                                               "num_inference_steps", "prompt_indices", "extra_train_args")}
    settings.pop("prompt_indices")
    settings["subject_prompts"] = sorted({f"{r['subject']}:{r['prompt_index']}" for r in rows})
    write_table(table, out, settings)
    plot(table, out)
    print((out / "table.md").read_text())


def write_runs(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main(parse_args())
