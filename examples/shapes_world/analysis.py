"""The decision rule of PROTOCOL.md: paired prompt-alignment gain and fidelity ratio of one configuration against
another, with 95% bootstrap intervals over (subject, prompt) clusters.

Reads the ``runs.csv`` written by ``experiment.py`` (one row per configuration × subject × prompt × training seed)
and compares two of its configurations on the pairs they share:

    python examples/shapes_world/analysis.py --runs runs/heldout/runs.csv --method "PALP@300" --baseline "TI+DB@300" \\
        --output examples/shapes_world/results/heldout/verdict.md
"""

import argparse
import csv
from pathlib import Path

import numpy as np

ALIGNMENT_GAIN_GOAL = 0.10
FIDELITY_RATIO_GOAL = 0.9
SUBJECT_NAMES = ("checkered_star", "ringed_circle", "orange_square", "checkered_triangle", "dotted_star",
                 "striped_triangle", "ringed_square", "orange_circle", "green_circle", "blue_triangle", "purple_star",
                 "red_square", "orange_triangle", "yellow_circle")
FIDELITY_COLUMNS = ("subject_fidelity", "appearance_fidelity", "identity_exact", "colour_hit", "pattern_hit",
                    "b_subject_fidelity", "b_appearance_fidelity")


def read_runs(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k not in ("config", "split", "subject", "prompt", "clean_prompt"):
                try:
                    r[k] = float(v)
                except (TypeError, ValueError):
                    pass
    return rows


def select(rows, label):
    """The rows of ``label``: a configuration name, or ``name@N`` for its runs scored at N steps."""
    name, _, steps = label.partition("@")
    return [r for r in rows if r["config"] == name and (not steps or int(r["steps"]) == int(steps))]


def paired(rows, method, baseline):
    """(cluster, method row, baseline row) for every (subject, prompt, seed) both configurations have."""
    key = lambda r: (r["subject"], int(r["prompt_index"]), int(r["train_seed"]))  # noqa: E731
    base = {}
    for r in select(rows, baseline):
        if key(r) in base:
            raise SystemExit(f"error: {baseline!r} has several step counts; name one as '{baseline}@N'")
        base[key(r)] = r
    pairs, seen = [], set()
    for r in select(rows, method):
        if key(r) in seen:
            raise SystemExit(f"error: {method!r} has several step counts; name one as '{method}@N'")
        seen.add(key(r))
        if key(r) in base:
            pairs.append(((r["subject"], int(r["prompt_index"])), r, base[key(r)]))
    if not pairs:
        raise SystemExit(f"error: no (subject, prompt, seed) run of both {method!r} and {baseline!r}")
    return pairs


def cluster_bootstrap(pairs, statistic, num_resamples=10_000, seed=0):
    """Point estimate and 95% percentile interval of ``statistic(list of pairs)``, resampling clusters."""
    clusters = {}
    for pair in pairs:
        clusters.setdefault(pair[0], []).append(pair)
    names = sorted(clusters)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_resamples):
        chosen = rng.integers(len(names), size=len(names))
        values.append(statistic([p for i in chosen for p in clusters[names[i]]]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(statistic(pairs)), float(low), float(high)


def gain(column):
    return lambda pairs: float(np.mean([m[column] - b[column] for _, m, b in pairs]))


def ratio(column):
    def statistic(pairs):
        base = np.mean([b[column] for _, _, b in pairs])
        return float(np.mean([m[column] for _, m, _ in pairs]) / base) if base > 0 else float("nan")

    return statistic


def verdict(pairs):
    """The protocol's rule on these pairs, and the figures reported beside it."""
    align = cluster_bootstrap(pairs, gain("prompt_alignment"))
    fidelity = cluster_bootstrap(pairs, ratio("subject_fidelity"))
    result = {
        "pairs": len(pairs),
        "clusters": len({p[0] for p in pairs}),
        "alignment_gain": align,
        "fidelity_ratio": fidelity,
        "aligns_better": align[1] > 0,
        "keeps_fidelity": fidelity[0] >= FIDELITY_RATIO_GOAL,
        "goal_met": align[0] >= ALIGNMENT_GAIN_GOAL and fidelity[0] >= FIDELITY_RATIO_GOAL,
        "means": {},
    }
    for column in ("prompt_alignment",) + FIDELITY_COLUMNS:
        if all(isinstance(m.get(column), float) and isinstance(b.get(column), float) for _, m, b in pairs):
            result["means"][column] = (float(np.mean([m[column] for _, m, _ in pairs])),
                                       float(np.mean([b[column] for _, _, b in pairs])))
            if column != "subject_fidelity" and column in FIDELITY_COLUMNS:
                result[f"{column}_ratio"] = cluster_bootstrap(pairs, ratio(column))
    return result


def format_verdict(result, method, baseline):
    a, f = result["alignment_gain"], result["fidelity_ratio"]
    lines = [
        f"## {method} against {baseline}",
        "",
        f"{result['pairs']} paired (subject, prompt, seed) runs in {result['clusters']} (subject, prompt) clusters; "
        "95% percentile bootstrap intervals over clusters (10,000 resamples).",
        "",
        "| quantity | estimate | 95% interval | rule | holds |",
        "|---|---|---|---|---|",
        f"| prompt-alignment gain | {a[0]:+.3f} | [{a[1]:+.3f}, {a[2]:+.3f}] | lower end > 0 | "
        f"{'yes' if result['aligns_better'] else 'no'} |",
        f"| prompt-alignment gain | {a[0]:+.3f} | | ≥ {ALIGNMENT_GAIN_GOAL:.2f} (goal) | "
        f"{'yes' if a[0] >= ALIGNMENT_GAIN_GOAL else 'no'} |",
        f"| subject-fidelity ratio | {f[0]:.3f} | [{f[1]:.3f}, {f[2]:.3f}] | ≥ {FIDELITY_RATIO_GOAL} | "
        f"{'yes' if result['keeps_fidelity'] else 'no'} |",
    ]
    for column in FIDELITY_COLUMNS[1:]:
        if f"{column}_ratio" in result:
            r = result[f"{column}_ratio"]
            lines.append(f"| {column.replace('_', ' ')} ratio (reported) | {r[0]:.3f} | [{r[1]:.3f}, {r[2]:.3f}] | – | – |")
    lines += ["", f"**Goal met: {'yes' if result['goal_met'] else 'no'}.**", "",
              f"| mean | {method} | {baseline} |", "|---|---|---|"]
    for column, (m, b) in result["means"].items():
        lines.append(f"| {column.replace('_', ' ')} | {m:.3f} | {b:.3f} |")
    return "\n".join(lines) + "\n"


def config_table(rows, baseline="TI+DB"):
    """Every configuration at every step count: means ± standard error over its runs, and its paired gain and
    fidelity ratio against ``baseline`` at the same step count (bootstrap intervals over clusters)."""
    entries = []
    labels = list(dict.fromkeys((r["config"], int(r["steps"])) for r in rows))
    for config, steps in labels:
        sel = select(rows, f"{config}@{steps}")
        entry = {"config": config, "steps": steps, "runs": len(sel)}
        for column in ("prompt_alignment", "subject_fidelity", "appearance_fidelity", "identity_exact",
                       "b_subject_fidelity", "b_appearance_fidelity", "diversity"):
            values = [r[column] for r in sel if isinstance(r.get(column), float)]
            if values:
                entry[column] = (float(np.mean(values)),
                                 float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0)
        if config != baseline and select(rows, f"{baseline}@{steps}"):
            pairs = paired(rows, f"{config}@{steps}", f"{baseline}@{steps}")
            entry["gain"] = cluster_bootstrap(pairs, gain("prompt_alignment"), num_resamples=2000)
            entry["ratio"] = cluster_bootstrap(pairs, ratio("subject_fidelity"), num_resamples=2000)
            entry["appearance_ratio"] = cluster_bootstrap(pairs, ratio("appearance_fidelity"), num_resamples=2000)
        entries.append(entry)
    return entries


def format_table(entries, baseline="TI+DB"):
    def ms(e, k):
        return f"{e[k][0]:.3f} ± {e[k][1]:.3f}" if k in e else "–"

    def ci(e, k, signed=False):
        if k not in e:
            return "–"
        f = "{:+.3f}" if signed else "{:.2f}"
        return f"{f.format(e[k][0])} [{f.format(e[k][1])}, {f.format(e[k][2])}]"

    lines = [f"| configuration | steps | runs | prompt alignment | subject fidelity | appearance fidelity | identity exact | "
             f"probe B fidelity | diversity | alignment gain vs {baseline} | fidelity ratio | appearance ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['config']} | {e['steps']} | {e['runs']} | {ms(e, 'prompt_alignment')} | "
                     f"{ms(e, 'subject_fidelity')} | {ms(e, 'appearance_fidelity')} | {ms(e, 'identity_exact')} | "
                     f"{ms(e, 'b_subject_fidelity')} | "
                     f"{e['diversity'][0]:.1f} | {ci(e, 'gain', True)} | {ci(e, 'ratio')} | {ci(e, 'appearance_ratio')} |")
    return "\n".join(lines) + "\n"


def plot_table(entries, path, baseline="TI+DB"):
    """Prompt alignment against subject fidelity, one line per configuration through its step counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    configs = list(dict.fromkeys(e["config"] for e in entries))
    for i, config in enumerate(configs):
        sel = sorted((e for e in entries if e["config"] == config), key=lambda e: e["steps"])
        x = [e["subject_fidelity"][0] for e in sel]
        y = [e["prompt_alignment"][0] for e in sel]
        colour = "black" if config == baseline else plt.get_cmap("tab20")(i % 20)  # one colour per configuration
        ax.plot(x, y, "--" if config == baseline else "-", color=colour, marker="osD^v<>Pp*X"[i % 11], label=config)
        for e in sel:
            ax.annotate(str(e["steps"]), (e["subject_fidelity"][0], e["prompt_alignment"][0]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("subject fidelity (probe: class, colour, pattern)")
    ax.set_ylabel("prompt alignment (probe: elements of y_c)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_diversity(folders, steps):
    """Per configuration: mean RMS pixel distance (0–255) between the samples of different training seeds for the
    same subject, prompt and sample seed, from experiment.py's ``samples_*.npz``. Near 0: every seed learns the same
    picture."""
    import re

    groups = {}
    for folder in folders:
        for path in Path(folder).glob("samples_*.npz"):
            match = re.fullmatch(r"samples_(.+)_p(\d+)_s(\d+)\.npz", path.name)
            if match:
                name = match.group(1)
                for subject in sorted(SUBJECT_NAMES, key=len, reverse=True):
                    if name.endswith("_" + subject):
                        groups.setdefault((name[: -len(subject) - 1], subject, match.group(2)), []).append(path)
                        break
    result = {}
    for (name, _, _), paths in groups.items():
        images = [np.load(p)[f"steps{steps}"].astype(np.float64) for p in paths if f"steps{steps}" in np.load(p)]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                d = np.sqrt(((images[i] - images[j]) ** 2).reshape(len(images[i]), -1).mean(1)).mean()
                result.setdefault(name, []).append(float(d))
    return {name: float(np.mean(v)) for name, v in result.items()}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="PROTOCOL.md's decision rule on experiment.py's runs.csv.")
    parser.add_argument("--runs", type=str, nargs="+", required=True, help="runs.csv file(s) of experiment.py.")
    parser.add_argument("--method", type=str, default=None,
                        help="Configuration under test: its `config` label, or label@steps.")
    parser.add_argument("--baseline", type=str, nargs="+", default=["TI+DB"],
                        help="Configuration(s) to compare against.")
    parser.add_argument("--output", type=str, default=None, help="Markdown file for the verdict.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="Only these training seeds (default: every seed in the files).")
    parser.add_argument("--complete_clusters", action="store_true",
                        help="Only (subject, prompt, seed) triples whose seed is finished for every cluster of the "
                        "method, so an unfinished run does not weigh some clusters more than others.")
    parser.add_argument("--table", type=str, default=None,
                        help="Instead of one verdict: write every configuration × step count to this folder "
                        "(table.md, plot.png), against the first --baseline.")
    return parser.parse_args(input_args)


def main(args):
    rows = [r for path in args.runs for r in read_runs(path)]
    if args.seeds is not None:
        rows = [r for r in rows if int(r["train_seed"]) in args.seeds]
    if args.complete_clusters and args.method:
        method = select(rows, args.method)
        clusters = {(r["subject"], int(r["prompt_index"])) for r in method}
        finished = {seed for seed in {int(r["train_seed"]) for r in method}
                    if len({(r["subject"], int(r["prompt_index"])) for r in method if int(r["train_seed"]) == seed})
                    == len(clusters)}
        rows = [r for r in rows if int(r["train_seed"]) in finished]
        print(f"complete seeds: {sorted(finished)}")
    if args.table:
        out = Path(args.table)
        out.mkdir(parents=True, exist_ok=True)
        entries = config_table(rows, args.baseline[0])
        (out / "table.md").write_text(format_table(entries, args.baseline[0]))
        plot_table(entries, out / "plot.png", args.baseline[0])
        steps = sorted({e["steps"] for e in entries})
        lines = ["", "Diversity across training seeds (mean RMS pixel distance between seeds, same prompt and sample "
                 "seed):", "", "| samples of | " + " | ".join(f"{s} steps" for s in steps) + " |",
                 "|---|" + "---|" * len(steps)]
        per_steps = {s: seed_diversity([Path(p).parent for p in args.runs], s) for s in steps}
        for name in sorted({n for d in per_steps.values() for n in d}):
            lines.append(f"| {name} | " + " | ".join(f"{per_steps[s][name]:.1f}" if name in per_steps[s] else "–"
                                                       for s in steps) + " |")
        with open(out / "table.md", "a") as f:
            f.write("\n".join(lines) + "\n")
        print((out / "table.md").read_text())
        return
    if args.method is None:
        raise SystemExit("error: give --method (or --table)")
    text = "".join(format_verdict(verdict(paired(rows, args.method, b)), args.method, b) + "\n" for b in args.baseline)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main(parse_args())
