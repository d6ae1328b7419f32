"""Score train_palp.py runs on the shapes world with the probe, and draw a comparison grid.

For every run folder (the ``--output_dir`` of train_palp.py) the base model is loaded with the run's LoRA and learned
embedding, ``--num_samples`` images of the run's target prompt are drawn (seeds ``--seed``, ``--seed + 1``, ...), and
the probe measures:

- prompt alignment: the fraction of the clean target prompt's elements (style, class, and where named background,
  companion, night) present in an image, averaged over the samples;
- subject fidelity: the fraction of the subject's identity (class, colour, pattern) present, averaged;
- identity exact: the fraction of samples with all three identity attributes right;
- the colour and the pattern hit rates on their own, and the subject fidelity read by the second, independently
  trained probe B (``probe_b/``), beside the shipped probe's.

The base model itself, given the clean prompt, is scored as the first row (it follows the prompt but cannot know the
subject). Writes ``metrics.json``, ``metrics.md`` and ``grid.png`` (rows: base with the clean prompt, then each run)
to ``--output_dir``:

    python examples/shapes_world/evaluate.py --runs runs/quickstart/ti_db runs/quickstart/palp \\
        --labels "TI+DB" "PALP" --output_dir runs/quickstart
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import probe as probe_lib
import torch
import world

EXAMPLES = str(Path(__file__).resolve().parents[1])  # examples/: sample_palp.py loads a run as users do
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

HERE = Path(__file__).resolve().parent


def subject_for_token(token):
    subjects = {name: s for split, _ in world.SPLITS.values() for name, s in split.items()}
    for name, subject in subjects.items():
        if subject["token"] == token:
            return name, subject
    raise ValueError(f"{token!r} is not a shapes-world subject token ({[s['token'] for s in subjects.values()]})")


def load_personalized(model, run_dir):
    """The base pipeline with a run's LoRA and learned embedding(s) loaded as ``examples/sample_palp.py`` loads them:
    the standard diffusers way, and for the flow world's StableDiffusion3Pipeline (no ``load_textual_inversion``)
    the token into both CLIP encoders by the lines of train_palp.py's model card."""
    from sample_palp import load_embedding

    pipe = probe_lib.load_pipeline(model)
    run_dir = Path(run_dir)
    pipe.load_lora_weights(str(run_dir), weight_name="pytorch_lora_weights.safetensors")
    for path in sorted(run_dir.glob("learned_embeds*.safetensors")):
        load_embedding(pipe, path)
    return pipe


def sample(pipe, prompt, num_samples, seed, guidance_scale, steps):
    """``num_samples`` images of one prompt, image i drawn from seed ``seed + i`` (uint8, (N, 32, 32, 3)). A
    multi-vector token is written out as ``sample_palp.py`` writes it for the pipeline."""
    from sample_palp import pipeline_prompt

    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_samples)]
    images = pipe([pipeline_prompt(pipe, prompt)] * num_samples, height=32, width=32, num_inference_steps=steps,
                  guidance_scale=guidance_scale, generator=generators, output_type="np",
                  **probe_lib.sampling_kwargs(pipe)).images
    return (images * 255).round().astype(np.uint8)


def score(preds, clean_prompt, identity):
    """Mean prompt alignment / subject fidelity / identity-exact rate, and per-element hit rates."""
    elements = probe_lib.prompt_elements(clean_prompt)
    per_element = {k: float(np.mean([p[k] == v for p in preds])) for k, v in elements.items()}
    per_identity = {k: float(np.mean([p[k] == identity[k] for p in preds])) for k in probe_lib.IDENTITY}
    return {
        "prompt_alignment": float(np.mean([probe_lib.prompt_alignment(p, clean_prompt) for p in preds])),
        "subject_fidelity": float(np.mean([probe_lib.subject_fidelity(p, identity) for p in preds])),
        "identity_exact": float(np.mean([all(p[k] == identity[k] for k in probe_lib.IDENTITY) for p in preds])),
        # Colour and pattern only: y_c asks for the class, so the base model scores it for free.
        "appearance_fidelity": float(np.mean([(p["colour"] == identity["colour"]) + (p["pattern"] == identity["pattern"])
                                              for p in preds]) / 2),
        "elements": per_element,
        "identity": per_identity,
    }


def read_run(run_dir):
    """A run's model, token and target prompt, and the clean prompt it is scored against: the target with the token
    replaced by 'a <class>', whatever y_c the run was trained with (a y_c that describes the subject's colour and
    pattern would otherwise count them as prompt elements)."""
    config = json.loads(Path(run_dir, "training_config.json").read_text())
    _, subject = subject_for_token(config["placeholder_token"])
    return {
        "model": config["pretrained_model_name_or_path"],
        "token": config["placeholder_token"],
        "target": config["target_prompt"],
        "clean": config["target_prompt"].replace(config["placeholder_token"], f"a {subject['shape']}"),
        "trained_clean": config.get("clean_prompt_resolved") or config["clean_prompt"],
    }


def scores_of(probe, images, clean_prompt, identity, probe_b=None):
    """The shipped probe's scores, and with ``probe_b`` the second probe's subject fidelity beside them."""
    scores = score(probe_lib.classify(probe, images), clean_prompt, identity)
    if probe_b is not None:
        scores["probe_b_subject_fidelity"] = score(probe_lib.classify(probe_b, images), clean_prompt,
                                                   identity)["subject_fidelity"]
    return scores


def evaluate_runs(runs, labels, probe, num_samples, seed, guidance_scale, steps, model=None, include_base=True,
                  probe_b=None):
    """Rows of (label, prompt, images, scores): the base model on the clean prompt first, then each run."""
    first = read_run(runs[0])
    model = model or first["model"]
    _, subject = subject_for_token(first["token"])
    identity = {k: subject[k] for k in probe_lib.IDENTITY}
    rows = []
    if include_base:
        base = probe_lib.load_pipeline(model)
        images = sample(base, first["clean"], num_samples, seed, guidance_scale, steps)
        rows.append(("base, clean prompt", first["clean"], images,
                     scores_of(probe, images, first["clean"], identity, probe_b)))
    for run, label in zip(runs, labels):
        info = read_run(run)
        pipe = load_personalized(model, run)
        images = sample(pipe, info["target"], num_samples, seed, guidance_scale, steps)
        rows.append((label, info["target"], images, scores_of(probe, images, info["clean"], identity, probe_b)))
    return rows


def draw_grid(rows, path, scale=3, label_width=150):
    """One row per model: a label, then its samples, upscaled."""
    from PIL import Image, ImageDraw

    n = max(len(r[2]) for r in rows)
    cell = 32 * scale
    grid = Image.new("RGB", (label_width + n * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, _, images, scores) in enumerate(rows):
        draw.text((4, r * cell + 4), label, fill=(0, 0, 0))
        draw.text((4, r * cell + 20), f"align {scores['prompt_alignment']:.2f}", fill=(0, 0, 0))
        draw.text((4, r * cell + 34), f"fidelity {scores['subject_fidelity']:.2f}", fill=(0, 0, 0))
        for i, im in enumerate(images):
            grid.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (label_width + i * cell, r * cell))
    grid.save(path)


REPORT_COLUMNS = [("prompt alignment", "prompt_alignment"), ("subject fidelity", "subject_fidelity"),
                  ("colour", "colour"), ("pattern", "pattern"), ("identity exact", "identity_exact"),
                  ("subject fidelity (probe B)", "probe_b_subject_fidelity")]


def report_values(scores):
    flat = {**scores, "colour": scores["identity"]["colour"], "pattern": scores["identity"]["pattern"]}
    return {key: flat.get(key) for _, key in REPORT_COLUMNS}


def method_means(results, methods):
    """Per method (in order of first appearance), the mean and the range over its runs (one run per training
    seed) of every report column; the base row, which has no method, is left out."""
    runs = [r for r in results if r["label"] != "base, clean prompt"]
    if len(methods) != len(runs):
        raise ValueError("--methods needs one method per --runs folder")
    out = {}
    for method, r in zip(methods, runs):
        out.setdefault(method, []).append(report_values(r))
    summary = {}
    for method, values in out.items():
        summary[method] = {"runs": len(values)}
        for _, key in REPORT_COLUMNS:
            column = [v[key] for v in values if v[key] is not None]
            if column:
                summary[method][key] = {"mean": float(np.mean(column)), "min": float(min(column)),
                                        "max": float(max(column))}
    return summary


def write_report(rows, output_dir, settings, methods=None):
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [{"label": label, "prompt": prompt, **scores} for label, prompt, _, scores in rows]
    summary = method_means(results, methods) if methods else None
    (out / "metrics.json").write_text(json.dumps({"settings": settings, "results": results, "methods": summary},
                                                 indent=1))
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | prompt | " + " | ".join(c for c, _ in REPORT_COLUMNS) + " |",
             "|---|---|" + "---|" * len(REPORT_COLUMNS)]
    for r in results:
        values = report_values(r)
        lines.append(f"| {r['label']} | `{r['prompt']}` | " + " | ".join(fmt(values[k]) for _, k in REPORT_COLUMNS)
                     + " |")
    if summary:
        lines += ["", "Mean over each method's runs (one per training seed), [lowest, highest] run:", "",
                  "| method | runs | " + " | ".join(c for c, _ in REPORT_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(REPORT_COLUMNS)]
        for method, s in summary.items():
            cells = [f"{s[k]['mean']:.3f} [{s[k]['min']:.2f}, {s[k]['max']:.2f}]" if k in s else "–"
                     for _, k in REPORT_COLUMNS]
            lines.append(f"| {method} | {s['runs']} | " + " | ".join(cells) + " |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    draw_grid(rows, out / "grid.png")
    return results, summary


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Score shapes-world train_palp.py runs with the probe.")
    parser.add_argument("--runs", type=str, nargs="+", required=True, help="train_palp.py output folders.")
    parser.add_argument("--labels", type=str, nargs="+", default=None, help="Row labels (default: folder names).")
    parser.add_argument("--model", type=str, default=None,
                        help="Base model folder (default: the one named in the first run's training_config.json).")
    parser.add_argument("--probe", type=str, default=str(probe_lib.DEFAULT_PROBE), help="The probe folder.")
    parser.add_argument("--probe_b", type=str, default=str(HERE / "probe_b"),
                        help="The second probe's folder, whose subject fidelity is reported beside; '' for none.")
    parser.add_argument("--methods", type=str, nargs="+", default=None,
                        help="The method of each run (e.g. one run per training seed): adds a table of per-method "
                        "means.")
    parser.add_argument("--num_samples", type=int, default=8, help="Samples per row.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first sample.")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="CFG scale of sampling.")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="DPM-Solver++ steps.")
    parser.add_argument("--output_dir", type=str, required=True, help="Where metrics and the grid are written.")
    return parser.parse_args(input_args)


def main(args):
    torch.set_num_threads(1)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("error: --labels needs one label per --runs folder")
    if args.methods and len(args.methods) != len(args.runs):
        raise SystemExit("error: --methods needs one method per --runs folder")
    probe = probe_lib.load_probe(args.probe)
    probe_b = probe_lib.load_probe(args.probe_b) if args.probe_b else None
    rows = evaluate_runs(args.runs, labels, probe, args.num_samples, args.seed, args.guidance_scale,
                         args.num_inference_steps, model=args.model, probe_b=probe_b)
    settings = {"num_samples": args.num_samples, "seed": args.seed, "guidance_scale": args.guidance_scale,
                "num_inference_steps": args.num_inference_steps}
    results, summary = write_report(rows, args.output_dir, settings, args.methods)
    for r in results:
        print(f"{r['label']:>22}: prompt alignment {r['prompt_alignment']:.3f}  subject fidelity "
              f"{r['subject_fidelity']:.3f}  colour {r['identity']['colour']:.3f}  identity exact "
              f"{r['identity_exact']:.3f}")
    for method, s in (summary or {}).items():
        print(f"{method:>22}: mean over {s['runs']} runs: prompt alignment {s['prompt_alignment']['mean']:.3f}  "
              f"subject fidelity {s['subject_fidelity']['mean']:.3f}  colour {s['colour']['mean']:.3f}")


if __name__ == "__main__":
    main(parse_args())
