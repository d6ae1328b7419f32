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


# ----------------------------------------------------------------------------------------------------------------
# Frontiers (PROTOCOL.md, "Which configuration goes to v2") and the v2 rule

APPEARANCE_PROBES = {"A": "appearance_fidelity", "B": "b_appearance_fidelity"}
V2_GAIN_GOAL, V2_APPEARANCE_GOAL, V2_APPEARANCE_FLOOR = 0.10, 0.95, 0.85
# Configuration labels of experiment.py that are one point of a mechanism's λ sweep, and their mechanism.
MECHANISM_PREFIXES = (("PALP (paper)", "paper's D"), ("PALP λ=", "paper's D"), ("PALP normalised D", "normalised D"),
                      ("class-cancelling D", "class-cancelling D"), ("identity-projected D", "identity-projected D"),
                      ("D on the LoRA only", "D on the LoRA only"), ("identity-bearing teacher",
                                                                    "identity-bearing teacher"),
                      ("calibrated D", "calibrated D"), ("class-source DDS", "class-source DDS"),
                      ("D on the token only", "D on the token only"), ("inverted teacher", "inverted teacher"),
                      ("identity-region D", "identity-region D"),
                      ("multi-vector token (4 vectors)", "multi-vector token (4 vectors)"))


def mechanism_of(label):
    """(mechanism, λ) of a configuration label of a λ sweep ('PALP λ=0.3' → ("paper's D", 0.3)), or None."""
    import re

    for prefix, mechanism in MECHANISM_PREFIXES:
        if label.startswith(prefix):
            rest = label[len(prefix):]
            if rest and not re.fullmatch(r"\s*λ=[0-9.]+|[0-9.]+", rest):
                return None  # a variant of the mechanism with other settings changed too
            weight = re.search(r"([0-9.]+)$", label) if rest else None
            return mechanism, float(weight.group(1)) if weight else 1.0
    return None


def best_steps(rows, config, column, candidates):
    """The step count among ``candidates`` where ``config``'s mean ``column`` is highest (ties: fewest steps)."""
    means = {}
    for steps in candidates:
        values = [r[column] for r in select(rows, f"{config}@{steps}") if isinstance(r.get(column), float)]
        if values:
            means[steps] = float(np.mean(values))
    if not means:
        raise SystemExit(f"error: no {config!r} runs with {column} at steps {candidates}")
    return max(sorted(means), key=lambda s: means[s])


def against_best_baseline(rows, method, baseline, candidates, num_resamples=10_000):
    """The protocol's comparison of ``method`` (label@steps) with ``baseline`` at its own best step count per
    quantity: the gain against its best-aligned step count, each probe's appearance ratio against its step count of
    highest appearance on that probe, the class-including fidelity ratio against its step count of highest fidelity.
    """
    align_steps = best_steps(rows, baseline, "prompt_alignment", candidates)
    result = {"gain": cluster_bootstrap(paired(rows, method, f"{baseline}@{align_steps}"), gain("prompt_alignment"),
                                        num_resamples),
              "gain_baseline_steps": align_steps}
    for probe, column in APPEARANCE_PROBES.items():
        steps = best_steps(rows, baseline, column, candidates)
        result[f"appearance_{probe}"] = cluster_bootstrap(paired(rows, method, f"{baseline}@{steps}"), ratio(column),
                                                          num_resamples)
        result[f"appearance_{probe}_baseline_steps"] = steps
    steps = best_steps(rows, baseline, "subject_fidelity", candidates)
    result["fidelity"] = cluster_bootstrap(paired(rows, method, f"{baseline}@{steps}"), ratio("subject_fidelity"),
                                           num_resamples)
    result["fidelity_baseline_steps"] = steps
    result["appearance"] = min(result["appearance_A"][0], result["appearance_B"][0])
    result["pairs"] = len(paired(rows, method, f"{baseline}@{align_steps}"))
    return result


def interpolate_at(points, x_key, y_key, level):
    """y where the curve through ``points`` (in λ order) first crosses x = level, linearly between the two points
    around the crossing; None when it never crosses."""
    for a, b in zip(points, points[1:]):
        xa, xb = a[x_key], b[x_key]
        if (xa - level) * (xb - level) <= 0 and xa != xb:
            return a[y_key] + (level - xa) / (xb - xa) * (b[y_key] - a[y_key])
    return None


def frontier(rows, baseline="TI+DB", candidates=(100, 200, 300), num_resamples=2000):
    """Every λ-sweep point against ``baseline`` at its best step counts, grouped by (mechanism, steps), with each
    curve's gain at appearance ratio 0.95 and appearance ratio at gain +0.10. A point with fewer runs than the
    baseline has at a step count (a sweep still running) is listed as incomplete and left out of the summaries."""
    available = [s for s in candidates if select(rows, f"{baseline}@{s}")]
    expected = min(len(select(rows, f"{baseline}@{s}")) for s in available) if available else 0
    points = []
    for config, steps in dict.fromkeys((r["config"], int(r["steps"])) for r in rows):
        found = mechanism_of(config)
        if found is None:
            continue
        result = against_best_baseline(rows, f"{config}@{steps}", baseline, available, num_resamples)
        points.append({"config": config, "mechanism": found[0], "weight": found[1], "steps": steps, **result,
                       "gain_estimate": result["gain"][0],
                       "alignment": float(np.mean([r["prompt_alignment"] for r in select(rows, f"{config}@{steps}")])),
                       "runs": len(select(rows, f"{config}@{steps}"))})
        points[-1]["complete"] = points[-1]["runs"] >= expected
    # The baseline at each step count, then its variants without an alignment term ("TI+DB 4 vectors": the same
    # two-stage training with other token settings), as points against the same references.
    baselines = []
    variants = [c for c in dict.fromkeys(r["config"] for r in rows) if c.startswith(f"{baseline} ")]
    for config in [baseline] + variants:
        for steps in available:
            sel = select(rows, f"{config}@{steps}")
            if not sel:
                continue
            baselines.append({"config": config, "steps": steps,
                              **against_best_baseline(rows, f"{config}@{steps}", baseline, available, num_resamples)}
                             if len(available) > 1 else {"config": config, "steps": steps})
            baselines[-1]["alignment"] = float(np.mean([r["prompt_alignment"] for r in sel]))
    curves = {}
    for p in points:
        if p["complete"]:
            curves.setdefault((p["mechanism"], p["steps"]), []).append(p)
    summaries = []
    for (mechanism, steps), curve in sorted(curves.items()):
        curve.sort(key=lambda p: p["weight"])
        eligible = [p for p in curve if p["appearance"] >= V2_APPEARANCE_GOAL]
        summaries.append({"mechanism": mechanism, "steps": steps, "weights": [p["weight"] for p in curve],
                          "gain_at_095": interpolate_at(curve, "appearance", "gain_estimate", V2_APPEARANCE_GOAL),
                          "appearance_at_010": interpolate_at(curve, "gain_estimate", "appearance", V2_GAIN_GOAL),
                          "best_eligible": max(eligible, key=lambda p: p["gain"][0]) if eligible else None})
    return points, baselines, summaries


def format_frontier(points, baselines, summaries):
    fmt = lambda v: f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"  # noqa: E731
    lines = ["| mechanism | λ | steps | runs | alignment | gain vs TI+DB (best-aligned steps) | appearance ratio A | "
             "appearance ratio B | fidelity ratio (with class) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["mechanism"], p["steps"], p["weight"])):
        g = p["gain"]
        runs = p["runs"] if p["complete"] else f"{p['runs']} (incomplete)"
        lines.append(f"| {p['mechanism']} | {p['weight']:g} | {p['steps']} | {runs} | {p['alignment']:.3f} | "
                     f"{g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}] | {fmt(p['appearance_A'])} | {fmt(p['appearance_B'])} | "
                     f"{fmt(p['fidelity'])} |")
    lines += ["", "TI+DB itself, and its variants without an alignment term, against the same references:", "",
              "| configuration | steps | alignment | gain | appearance ratio A | appearance ratio B |",
              "|---|---|---|---|---|---|"]
    for b in baselines:
        if "gain" in b:
            g = b["gain"]
            lines.append(f"| {b['config']} | {b['steps']} | {b['alignment']:.3f} | {g[0]:+.3f} [{g[1]:+.3f}, "
                         f"{g[2]:+.3f}] | {fmt(b['appearance_A'])} | {fmt(b['appearance_B'])} |")
    if points:
        p = points[0]
        lines += ["", f"References: gain against TI+DB@{p['gain_baseline_steps']}; appearance ratio A against "
                  f"TI+DB@{p['appearance_A_baseline_steps']}, B against TI+DB@{p['appearance_B_baseline_steps']}. "
                  "The appearance ratio of a point is the lower of A and B."]
    lines += ["", "| mechanism | steps | λ swept | gain at appearance ratio 0.95 | appearance ratio at gain +0.10 | "
              "best point with appearance ≥ 0.95 |", "|---|---|---|---|---|---|"]
    for s in summaries:
        best = s["best_eligible"]
        lines.append(f"| {s['mechanism']} | {s['steps']} | {', '.join(f'{w:g}' for w in s['weights'])} | "
                     + (f"{s['gain_at_095']:+.3f}" if s["gain_at_095"] is not None else "not crossed") + " | "
                     + (f"{s['appearance_at_010']:.2f}" if s["appearance_at_010"] is not None else "not crossed")
                     + " | " + (f"λ={best['weight']:g}: {best['gain'][0]:+.3f} at {best['appearance']:.2f}"
                                if best else "none") + " |")
    eligible = [p for p in points if p["complete"] and p["appearance"] >= V2_APPEARANCE_GOAL]
    if eligible:
        best = max(eligible, key=lambda p: p["gain"][0])
        lines += ["", f"**Most alignment at appearance ≥ 0.95: {best['config']} at {best['steps']} steps, gain "
                  f"{best['gain'][0]:+.3f}, appearance ratio {best['appearance']:.2f}.**"]
    variants = [b for b in baselines if "gain" in b and b["config"] != baselines[0]["config"]
                and b["appearance"] >= V2_APPEARANCE_GOAL]
    if variants:
        best = max(variants, key=lambda b: b["gain"][0])
        lines += ["", f"Without an alignment term, most alignment at appearance ≥ 0.95: {best['config']} at "
                  f"{best['steps']} steps, gain {best['gain'][0]:+.3f}, appearance ratio {best['appearance']:.2f}."]
    return "\n".join(lines) + "\n"


def plot_frontier(points, baselines, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    mechanisms = sorted({p["mechanism"] for p in points})
    for ax, probe in zip(axes, "AB"):
        for i, mechanism in enumerate(mechanisms):
            colour = plt.get_cmap("tab10")(i % 10)
            for steps, style in ((100, ":"), (200, "-"), (300, "--")):
                curve = sorted((p for p in points if p["complete"] and p["mechanism"] == mechanism
                                and p["steps"] == steps),
                               key=lambda p: p["weight"])
                if not curve:
                    continue
                x = [p[f"appearance_{probe}"][0] for p in curve]
                y = [p["gain"][0] for p in curve]
                ax.plot(x, y, style, color=colour, marker="o", label=f"{mechanism}, {steps} steps")
                for p in curve:
                    ax.annotate(f"{p['weight']:g}", (p[f"appearance_{probe}"][0], p["gain"][0]), fontsize=6,
                                textcoords="offset points", xytext=(3, 3))
        for b in baselines:
            if "gain" in b:
                ax.plot(b[f"appearance_{probe}"][0], b["gain"][0], "ks" if b["config"] == baselines[0]["config"] else "kD")
                ax.annotate(f"{b['config']} {b['steps']}", (b[f"appearance_{probe}"][0], b["gain"][0]), fontsize=7,
                            textcoords="offset points", xytext=(3, -9))
        ax.axvline(V2_APPEARANCE_GOAL, color="grey", lw=0.8)
        ax.axhline(V2_GAIN_GOAL, color="grey", lw=0.8)
        ax.set_xlabel(f"appearance-fidelity ratio, probe {probe} (colour + pattern) vs TI+DB at its best")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("prompt-alignment gain vs TI+DB at its best-aligned step count")
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def v2_verdict(rows, method, baseline="TI+DB", candidates=(100, 200, 300)):
    """PROTOCOL.md's v2 rule, with leave-one-subject-out, as markdown."""
    result = against_best_baseline(rows, method, baseline, candidates)
    g, a, b, f = result["gain"], result["appearance_A"], result["appearance_B"], result["fidelity"]
    gain_holds = g[1] > 0 and g[0] >= V2_GAIN_GOAL
    appearance_holds = {p: v[0] >= V2_APPEARANCE_GOAL and v[1] >= V2_APPEARANCE_FLOOR for p, v in (("A", a), ("B", b))}
    clusters = len({(r["subject"], int(r["prompt_index"])) for r in select(rows, method)})
    lines = [f"## {method} against {baseline} at its own best step count", "",
             f"{result['pairs']} paired (subject, prompt, seed) runs in {clusters} (subject, prompt) clusters; 95% "
             "percentile bootstrap intervals over clusters (10,000 resamples).", "",
             "| quantity | baseline | estimate | 95% interval | rule | holds |", "|---|---|---|---|---|---|",
             f"| prompt-alignment gain | {baseline}@{result['gain_baseline_steps']} | {g[0]:+.3f} | "
             f"[{g[1]:+.3f}, {g[2]:+.3f}] | lower end > 0 and ≥ +{V2_GAIN_GOAL:.2f} | {'yes' if gain_holds else 'no'} |"]
    for probe, v in (("A", a), ("B", b)):
        lines.append(f"| appearance ratio, probe {probe} | {baseline}@{result[f'appearance_{probe}_baseline_steps']} | "
                     f"{v[0]:.3f} | [{v[1]:.3f}, {v[2]:.3f}] | ≥ {V2_APPEARANCE_GOAL} and lower end ≥ "
                     f"{V2_APPEARANCE_FLOOR} | {'yes' if appearance_holds[probe] else 'no'} |")
    lines.append(f"| subject-fidelity ratio (reported) | {baseline}@{result['fidelity_baseline_steps']} | {f[0]:.3f} | "
                 f"[{f[1]:.3f}, {f[2]:.3f}] | – | – |")
    met = gain_holds and all(appearance_holds.values())
    lines += ["", f"**Goal met: {'yes' if met else 'no'}.**", "", "Leave one subject out:", "",
              "| without | gain | appearance ratio A | appearance ratio B |", "|---|---|---|---|"]
    subjects = sorted({r["subject"] for r in select(rows, method)})
    for subject in subjects if len(subjects) > 1 else []:
        kept = [r for r in rows if r["subject"] != subject]
        loo = against_best_baseline(kept, method, baseline, candidates, num_resamples=1000)
        lines.append(f"| {subject} | {loo['gain'][0]:+.3f} | {loo['appearance_A'][0]:.3f} | "
                     f"{loo['appearance_B'][0]:.3f} |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--frontier", type=str, default=None,
                        help="Write every λ sweep's points and summaries to this folder (frontier.md, frontier.png), "
                        "against the first --baseline at its best of 100/200/300 steps.")
    parser.add_argument("--v2_rule", action="store_true",
                        help="Apply PROTOCOL.md's v2 rule to --method against the first --baseline at its own best "
                        "of 100/200/300 steps, with leave-one-subject-out.")
    parser.add_argument("--baseline_steps", type=int, nargs="+", default=[100, 200, 300],
                        help="With --v2_rule or --frontier: the baseline's step counts to pick its best from.")
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
    if args.frontier:
        out = Path(args.frontier)
        out.mkdir(parents=True, exist_ok=True)
        points, baselines, summaries = frontier(rows, args.baseline[0], tuple(args.baseline_steps))
        (out / "frontier.md").write_text(format_frontier(points, baselines, summaries))
        plot_frontier(points, baselines, out / "frontier.png")
        print((out / "frontier.md").read_text())
        return
    if args.v2_rule:
        text = v2_verdict(rows, args.method, args.baseline[0], tuple(args.baseline_steps))
        print(text)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text)
        return
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
