"""Run configurations of train_palp.py on a split of the shapes world, over several training seeds, and score them.

One row per configuration × subject × prompt × training seed × step count goes to ``<output_dir>/runs.csv``, with the
metrics of PROTOCOL.md (``analysis.py`` applies its decision rule to that file). Each run trains once to the largest
of ``--steps`` and is scored from its checkpoints at every smaller count as well, so a step curve costs one run: with
a constant learning rate the checkpoint at step N holds exactly what an N-step run ends with. A TI+DB run
(``--alignment_mode none``) does not depend on the target prompt, so it is trained once per subject and seed and scored
on every prompt.

    python examples/shapes_world/experiment.py --split dev --configs "TI+DB" "PALP (paper)" \\
        --prompt_indices 0 3 --seeds 0 1 --steps 100 300 --output_dir runs/dev

Finished (configuration, subject, prompt, seed) runs are skipped, so an interrupted experiment resumes.
"""

import argparse
import csv
import sys
import time
from pathlib import Path

import ablation
import evaluate
import numpy as np
import probe as probe_lib
import torch
import world

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROBE_B = HERE / "probe_b"

# The world's personalization settings (README): batch 4, LoRA rank 8, learning rate 3e-3.
WORLD_ARGS = ["--train_batch_size", "4", "--learning_rate", "3e-3", "--rank", "8"]
# train_palp.py's defaults of the token and of λ when the committed results were made (one vector, λ = 1), pinned so
# that every configuration means what its results say; a configuration's own flags come after and win.
PINNED_DEFAULTS = ["--num_vectors", "1", "--alignment_weight", "1"]
PAPER = ["--alignment_mode", "dds", "--guidance_scale_pretrained", "15", "--guidance_scale_personalized", "7.5",
         "--alignment_weight", "1", "--alignment_normalization", "none"]

NORMALISED_DEFAULTS = ["--alignment_mode", "dds", "--alignment_normalization", "personalization"]

SUBJECT_FOLDERS = {"dev": "subjects", "heldout": "subjects_heldout", "heldout_v2": "subjects_heldout_v2"}
DESCRIBED = "{described clean prompt}"  # replaced per run by described_clean_prompt()

# Every configuration tried goes here and into the results table; labels are stable (they key runs.csv).
CONFIGS = {
    "TI+DB": ["--alignment_mode", "none"],
    "PALP (paper)": PAPER,
    "PALP α=β=7.5": PAPER + ["--guidance_scale_pretrained", "7.5"],
    "PALP λ=0.3": PAPER + ["--alignment_weight", "0.3"],
    "PALP λ=0.1": PAPER + ["--alignment_weight", "0.1"],
    "PALP t2≤0.6T": PAPER + ["--alignment_timestep_max_ratio", "0.6"],
    "PALP warm-up 100 steps": PAPER + ["--alignment_warmup_steps", "100"],
    "PALP w=1-ᾱ": PAPER + ["--alignment_weighting", "one_minus_alpha_bar"],
    "PALP normalised D": PAPER + ["--alignment_normalization", "personalization"],
    "PALP normalised D λ=2": PAPER + ["--alignment_normalization", "personalization", "--alignment_weight", "2"],
    "PALP normalised D λ=1.5": PAPER + ["--alignment_normalization", "personalization", "--alignment_weight", "1.5"],
    "PALP normalised D α=β=7.5": PAPER + ["--alignment_normalization", "personalization",
                                          "--guidance_scale_pretrained", "7.5"],
    # train_palp.py's defaults when v1's checks ran (the normalised D, λ = 1), pinned, so that the label keeps the
    # meaning of its committed runs; the defaults are now the paper's D, the configuration "PALP (paper)".
    "PALP (defaults)": NORMALISED_DEFAULTS,
    # One change at a time from those defaults.
    "PALP (defaults) w=1-ᾱ": NORMALISED_DEFAULTS + ["--alignment_weighting", "one_minus_alpha_bar"],
    "PALP (defaults) projected D": NORMALISED_DEFAULTS + ["--alignment_projection", "residual"],
    "PALP (defaults) projected D λ=2": NORMALISED_DEFAULTS + ["--alignment_projection", "residual",
                                                              "--alignment_weight", "2"],
    # y_c names what the subject looks like ("a sketch of a yellow checkered star on ..."), as a user can write it
    # with --clean_prompt: D then has no reason to pull the colour and pattern towards the class average.
    "PALP (defaults) described y_c": NORMALISED_DEFAULTS + ["--clean_prompt", DESCRIBED],
    # Frontiers (issue: move the alignment–fidelity line, not along it): each mechanism at several strengths λ, on
    # the paper's unnormalised D so that the push does not fade as the LoRA memorises its photos.
    "PALP λ=0.6": PAPER + ["--alignment_weight", "0.6"],
    **{f"class-cancelling D λ={w}": PAPER + ["--alignment_mode", "class_delta", "--alignment_weight", w]
       for w in ("0.03", "0.1", "0.3", "0.6", "1")},
    **{f"identity-projected D λ={w}": PAPER + ["--alignment_projection", "identity", "--alignment_weight", w]
       for w in ("0.1", "0.3", "0.6", "1")},
    **{f"D on the LoRA only λ={w}": PAPER + ["--alignment_gradient", "lora", "--alignment_weight", w]
       for w in ("0.03", "0.1", "0.3", "0.6", "1")},
    **{f"identity-bearing teacher λ={w}": PAPER + ["--alignment_mode", "teacher", "--alignment_weight", w]
       for w in ("0.1", "0.3", "0.6", "1")},
    # DDS from the class phrase: the personalized prediction given ỹ_P ("a photo of a star") instead of y_P, which
    # takes out of D the -β·u term that pushes the subject towards a generic member of its class.
    **{f"class-source DDS λ={w}": PAPER + ["--alignment_mode", "class_source", "--alignment_weight", w]
       for w in ("0.03", "0.1", "0.3", "0.6", "1", "2")},
    # The alignment gradient kept off the LoRA (the converse of "D on the LoRA only").
    **{f"D on the token only λ={w}": PAPER + ["--alignment_gradient", "token", "--alignment_weight", w]
       for w in ("0.3", "0.6", "1", "2")},
    # The identity-bearing teacher whose token is trained to carry the subject in the frozen model as well.
    **{f"inverted teacher λ={w}": PAPER + ["--alignment_mode", "teacher", "--teacher_inversion",
                                           "--alignment_weight", w]
       for w in ("0.1", "0.3", "1", "3")},
    "PALP normalised D λ=0.5": PAPER + ["--alignment_normalization", "personalization", "--alignment_weight", "0.5"],
    # D times one factor measured over the first 25 steps, then held: the paper's D with λ set on the ratio of the
    # two pushes at the start, so that it does not fade as the residual shrinks.
    **{f"calibrated D λ={w}": PAPER + ["--alignment_normalization", "calibrated", "--alignment_weight", w]
       for w in ("0.5", "1", "2", "4")},
    # D kept off the subject's region: weighted per latent position by 1 - |u|/max|u|, u the personalized model's
    # identity direction at x̂_t2, so the pull towards the generic class member fades where the subject is drawn.
    **{f"identity-region D λ={w}": PAPER + ["--alignment_projection", "identity_region", "--alignment_weight", w]
       for w in ("0.3", "0.6", "1", "2")},
    # The subject's token as 4 embedding vectors instead of one (--num_vectors), so that its identity has more room in
    # the text embedding; with the paper's D, and against TI+DB with the same 4 vectors.
    **{f"multi-vector token (4 vectors) λ={w}": PAPER + ["--num_vectors", "4", "--alignment_weight", w]
       for w in ("0.1", "0.3", "0.6", "1")},
    "TI+DB 4 vectors": ["--alignment_mode", "none", "--num_vectors", "4"],
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Configurations × subjects × prompts × seeds on the shapes world.")
    parser.add_argument("--split", type=str, default="dev", choices=list(world.SPLITS), help="Which split.")
    parser.add_argument("--configs", type=str, nargs="+", required=True, choices=list(CONFIGS), help="What to run.")
    parser.add_argument("--subjects", type=str, nargs="+", default=None, help="Default: every subject of the split.")
    parser.add_argument("--prompt_indices", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="Target prompts.")
    parser.add_argument("--pairs", type=str, nargs="+", default=None,
                        help="Instead of --subjects × --prompt_indices: subject:index pairs, e.g. checkered_star:0.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train_palp.py --seed values.")
    parser.add_argument("--steps", type=int, nargs="+", default=[300], help="Step counts to score (one run each).")
    parser.add_argument("--model", type=str, default=str(HERE / "model"), help="The shapes-world base model.")
    parser.add_argument("--subjects_dir", type=str, default=None,
                        help="Default: subjects/ (dev), subjects_heldout/ (heldout) or subjects_heldout_v2/ "
                        "(heldout_v2) next to this file.")
    parser.add_argument("--num_samples", type=int, default=8, help="Samples per (run, prompt).")
    parser.add_argument("--sample_seed", type=int, default=100, help="Seed of the first sample.")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="CFG of sampling.")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="DPM-Solver++ steps.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--keep_runs", action="store_true", help="Keep the trained LoRA folders (default: deleted).")
    parser.add_argument("--output_dir", type=str, required=True, help="runs.csv, samples and (maybe) the runs.")
    return parser.parse_args(input_args)


def train_command(model, photos, subject, target, max_steps, checkpointing_steps, seed, out):
    """train_palp.py flags of one run: the world's settings and PINNED_DEFAULTS; every other alignment setting not in
    the configuration is train_palp.py's own default."""
    return [
        "--pretrained_model_name_or_path", model, "--instance_data_dir", str(photos),
        "--placeholder_token", subject["token"], "--class_name", subject["shape"],
        "--target_prompt", target, "--personalization_prompt", "a photo of {token}", "--resolution", "32",
        "--max_train_steps", str(max_steps), "--checkpointing_steps", str(checkpointing_steps), "--seed", str(seed),
        "--num_validation_images", "0", "--report_to", "none", "--output_dir", str(out), "--overwrite_output_dir",
    ] + WORLD_ARGS + PINNED_DEFAULTS + model_args(model)


def is_prompt_free(flags):
    """Whether a configuration trains without the alignment term (its last --alignment_mode is 'none'): such a run
    never sees the target prompt, so one run serves every prompt of its subject and seed."""
    modes = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--alignment_mode"]
    return bool(modes) and modes[-1] == "none"


def model_args(model):
    """train_palp.py flags a world model needs: the flow world conditions on no T5 tokens, as it was trained."""
    if not probe_lib.is_flow_model(model):
        return []
    from pretrain_flow import T5_SEQUENCE_LENGTH

    return ["--max_sequence_length", str(T5_SEQUENCE_LENGTH)]


def described_clean_prompt(subject, clean):
    """The clean prompt with the class noun described as the world's captions write it: 'a sketch of a star …' →
    'a sketch of a yellow checkered star …' (a plain pattern is not named)."""
    words = [subject["colour"]] + ([subject["pattern"]] if subject["pattern"] != "plain" else []) + [subject["shape"]]
    described = clean.replace(f"a {subject['shape']}", "a " + " ".join(words), 1)
    if described == clean:
        raise ValueError(f"{clean!r} does not name 'a {subject['shape']}'")
    return described


def diversity(images):
    """Mean pairwise RMS distance (0–255 scale) between images: near 0 for a run that draws one picture."""
    x = images.reshape(len(images), -1).astype(np.float64)
    d = [np.sqrt(np.mean((x[i] - x[j]) ** 2)) for i in range(len(x)) for j in range(i + 1, len(x))]
    return float(np.mean(d)) if d else 0.0


def metrics(probes, images, clean, identity):
    row = {}
    for prefix, probe in probes.items():
        s = evaluate.score(probe_lib.classify(probe, images), clean, identity)
        row[prefix + "prompt_alignment"] = s["prompt_alignment"]
        row[prefix + "subject_fidelity"] = s["subject_fidelity"]
        row[prefix + "appearance_fidelity"] = s["appearance_fidelity"]
        row[prefix + "identity_exact"] = s["identity_exact"]
        row[prefix + "colour_hit"] = s["identity"]["colour"]
        row[prefix + "pattern_hit"] = s["identity"]["pattern"]
        for element in ("style", "background", "companion", "night"):
            row[f"{prefix}el_{element}"] = s["elements"].get(element, "")
    row["diversity"] = diversity(images)
    return row


def score_folder(args, probes, folder, target, clean, identity):
    pipe = evaluate.load_personalized(args.model, folder)
    images = evaluate.sample(pipe, target, args.num_samples, args.sample_seed, args.guidance_scale,
                             args.num_inference_steps)
    return images, metrics(probes, images, clean, identity)


def main(args):
    torch.set_num_threads(args.num_threads)
    sys.path.insert(0, str(REPO))
    import train_palp

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects_dir = Path(args.subjects_dir or HERE / SUBJECT_FOLDERS[args.split])
    if args.pairs:
        chosen = {}
        for pair in args.pairs:
            name, _, index = pair.partition(":")
            chosen.setdefault(name, []).append(int(index))
    else:
        chosen = {name: args.prompt_indices for name in args.subjects or world.SPLITS[args.split][0]}
    probes = {"": probe_lib.load_probe()}
    if PROBE_B.is_dir():
        probes["b_"] = probe_lib.load_probe(PROBE_B)
    runs_csv = out / "runs.csv"
    rows = list(csv.DictReader(open(runs_csv))) if runs_csv.exists() else []
    done = {(r["config"], r["subject"], int(r["prompt_index"]), int(r["train_seed"])) for r in rows}
    max_steps = max(args.steps)
    start = time.time()
    for config in args.configs:
        prompt_free = is_prompt_free(CONFIGS[config])
        for subject_name, prompt_indices in chosen.items():
            subject = world.find_subject(subject_name)
            identity = {k: subject[k] for k in probe_lib.IDENTITY}
            pairs = world.target_prompts(subject_name)
            for seed in args.seeds:
                todo = [i for i in prompt_indices if (config, subject_name, i, seed) not in done]
                # A prompt-free run is trained once for all prompts; a PALP run once per prompt.
                groups = [todo] if prompt_free and todo else [[i] for i in todo]
                for group in groups:
                    run_dir = out / "runs" / ablation.slug(config) / subject_name / f"p{group[0]}_s{seed}"
                    command = train_command(args.model, subjects_dir / subject_name, subject, pairs[group[0]][0],
                                            max_steps, min(args.steps), seed, run_dir)
                    described = described_clean_prompt(subject, pairs[group[0]][1])
                    command += [described if a == DESCRIBED else a for a in CONFIGS[config]]
                    t0 = time.time()
                    ablation.train_run(train_palp, command)
                    seconds = time.time() - t0
                    for index in group:
                        target, clean = pairs[index]
                        samples = {}
                        for steps in sorted(args.steps):
                            folder = run_dir if steps == max_steps else run_dir / f"checkpoint-{steps}"
                            images, row = score_folder(args, probes, folder, target, clean, identity)
                            samples[f"steps{steps}"] = images
                            rows.append({"config": config, "split": args.split, "subject": subject_name,
                                         "prompt_index": index, "prompt": target, "clean_prompt": clean,
                                         "train_seed": seed, "steps": steps, "train_seconds": round(seconds, 1),
                                         **row})
                        np.savez_compressed(out / f"samples_{ablation.slug(config)}_{subject_name}_p{index}_s{seed}.npz",
                                            **samples)
                        last = rows[-1]
                        print(f"[{(time.time() - start) / 60:.1f} min] {config} {subject_name} p{index} s{seed}: "
                              f"align {last['prompt_alignment']:.3f} fidelity {last['subject_fidelity']:.3f} "
                              f"appearance {last['appearance_fidelity']:.3f} ({seconds:.0f}s)", flush=True)
                    write_rows(rows, runs_csv)
                    if not args.keep_runs:
                        import shutil

                        shutil.rmtree(run_dir, ignore_errors=True)


def write_rows(rows, path):
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main(parse_args())
