"""The held-out decision rule (examples/shapes_world/analysis.py) on synthetic runs with known answers."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples" / "shapes_world"))
import analysis  # noqa: E402
import world  # noqa: E402


def _rows(gain, fidelity_ratio, steps=200, noise=0.02, seed=0):
    """TI+DB and PALP rows over 4 subjects × 6 prompts × 3 seeds, PALP = TI+DB + gain, fidelity × ratio."""
    rng = np.random.default_rng(seed)
    rows = []
    for subject in world.HELDOUT_SUBJECTS:
        for prompt in range(6):
            for train_seed in range(3):
                align, fidelity = rng.uniform(0.5, 0.8), rng.uniform(0.5, 0.9)
                common = {"split": "heldout", "subject": subject, "prompt_index": float(prompt),
                          "train_seed": float(train_seed), "steps": float(steps)}
                rows.append({**common, "config": "TI+DB", "prompt_alignment": align, "subject_fidelity": fidelity})
                rows.append({**common, "config": "PALP", "prompt_alignment": align + gain + rng.normal(0, noise),
                             "subject_fidelity": fidelity * fidelity_ratio})
    return rows


def test_a_clear_gain_at_kept_fidelity_meets_the_goal():
    pairs = analysis.paired(_rows(gain=0.15, fidelity_ratio=0.95), "PALP@200", "TI+DB@200")
    assert len(pairs) == 72 and len({p[0] for p in pairs}) == 24
    result = analysis.verdict(pairs)
    estimate, low, high = result["alignment_gain"]
    assert abs(estimate - 0.15) < 0.01 and 0 < low < estimate < high
    assert abs(result["fidelity_ratio"][0] - 0.95) < 1e-9
    assert result["aligns_better"] and result["keeps_fidelity"] and result["goal_met"]


@pytest.mark.parametrize("gain,ratio,aligns,keeps,goal", [
    (0.05, 0.95, True, True, False),   # better, but below the +0.10 goal
    (0.15, 0.80, True, False, False),  # aligned, but the subject is given away
    (0.0, 1.0, False, True, False),    # no gain: the interval straddles 0
])
def test_the_rule_says_no_where_it_should(gain, ratio, aligns, keeps, goal):
    result = analysis.verdict(analysis.paired(_rows(gain, ratio), "PALP@200", "TI+DB@200"))
    assert (result["aligns_better"], result["keeps_fidelity"], result["goal_met"]) == (aligns, keeps, goal)


def test_bootstrap_resamples_clusters_not_runs():
    """One cluster with a huge gain and 23 with none: the interval must be wide (resampling clusters), and the
    percentile interval must contain the point estimate."""
    rows = _rows(gain=0.0, fidelity_ratio=1.0, noise=0.0)
    for r in rows:
        if r["config"] == "PALP" and r["subject"] == "dotted_star" and r["prompt_index"] == 0:
            r["prompt_alignment"] += 2.4
    estimate, low, high = analysis.cluster_bootstrap(analysis.paired(rows, "PALP", "TI+DB"), analysis.gain(
        "prompt_alignment"))
    assert abs(estimate - 0.1) < 1e-9 and low == pytest.approx(0.0) and high > 0.2


def test_several_step_counts_must_be_named():
    rows = _rows(0.1, 1.0) + _rows(0.1, 1.0, steps=100)
    with pytest.raises(SystemExit, match="@N"):
        analysis.paired(rows, "PALP", "TI+DB@200")
    assert len(analysis.paired(rows, "PALP@100", "TI+DB@200")) == 72


def test_experiment_configurations_reach_train_palp_as_labelled():
    """Each label's flags give train_palp.py the alignment settings the label names: the paper's D is unnormalised
    and is now the script's default, "PALP (defaults)" keeps the normalised D its committed runs were trained with,
    and a described y_c names the subject's colour and pattern for every subject of both splits."""
    import experiment

    import train_palp

    def config_of(label, subject="checkered_star", index=0):
        subject_dict = world.find_subject(subject)
        target, clean = world.target_prompts(subject)[index]
        photos = experiment.HERE / ("subjects" if world.split_of(subject) == "dev" else "subjects_heldout") / subject
        command = experiment.train_command(str(experiment.HERE / "model"), photos, subject_dict, target, 10, 10, 0,
                                           "out")
        described = experiment.described_clean_prompt(subject_dict, clean)
        config_of.base = list(command)
        command += [described if a == experiment.DESCRIBED else a for a in experiment.CONFIGS[label]]
        return train_palp.parse_args(command)

    assert train_palp.AlignmentConfig.from_args(config_of("PALP (paper)")).normalization == "none"
    assert train_palp.AlignmentConfig.from_args(config_of("PALP normalised D")).normalization == "personalization"
    paper = train_palp.AlignmentConfig.from_args(config_of("PALP (paper)"))
    assert train_palp.AlignmentConfig.from_args(train_palp.parse_args(config_of.base)) == paper  # the script's defaults
    defaults = config_of("PALP (defaults)")
    assert train_palp.AlignmentConfig.from_args(defaults).normalization == "personalization"
    assert train_palp.AlignmentConfig.from_args(config_of("PALP normalised D")) == train_palp.AlignmentConfig.from_args(
        defaults)
    assert defaults.clean_prompt is None and train_palp.AlignmentConfig.from_args(config_of("TI+DB")).mode == "none"
    multi_vector = config_of("multi-vector token (4 vectors) λ=0.3")
    assert (multi_vector.num_vectors, multi_vector.alignment_weight, multi_vector.alignment_normalization) == (
        4, 0.3, "none")  # fmt: skip
    assert (config_of("TI+DB 4 vectors").alignment_mode, config_of("TI+DB 4 vectors").num_vectors) == ("none", 4)
    for split in ("dev", "heldout"):
        for name in world.SPLITS[split][0]:
            subject = world.find_subject(name)
            for index, (_, clean) in enumerate(world.target_prompts(name)):
                y_c = config_of("PALP (defaults) described y_c", name, index).clean_prompt
                asked = world.parse_caption(y_c)
                assert asked["shape"] == subject["shape"] and asked["colour"] == subject["colour"]
                assert asked.get("pattern", "plain") == subject["pattern"]
                assert {k: v for k, v in asked.items() if k not in ("colour", "pattern")} == world.parse_caption(clean)


def test_heldout_script_regenerates_the_committed_verdicts(tmp_path):
    """heldout.sh as committed writes, from the committed runs, exactly the committed verdict.md of both v1 looks, of
    v2's (the rule's point) and of the flow world's v2 look (the paper's settings), with the commands PROTOCOL.md
    gives."""
    import shutil
    import subprocess

    results = REPO_ROOT / "examples" / "shapes_world" / "results"
    v2 = {"SPLIT": "heldout_v2", "CONFIG": "multi-vector token (4 vectors) λ=0.1", "STEPS": "100", "PALP_STEPS": "100"}
    for name, env in (("heldout", {}), ("heldout_described", {"CONFIG": "PALP (defaults) described y_c",
                                                              "EXTRA_BASELINES": "PALP (defaults)@200"}),
                      ("heldout_v2", v2),
                      ("flow_heldout_v2", {"SPLIT": "heldout_v2", "CONFIG": "PALP (paper)", "STEPS": "200",
                                           "MODEL": str(REPO_ROOT / "examples" / "shapes_world" / "model_flow")})):
        copy = tmp_path / name
        shutil.copytree(results / name, copy)
        (copy / "verdict.md").unlink()
        subprocess.run(["bash", str(REPO_ROOT / "examples" / "shapes_world" / "heldout.sh")], check=True,
                       capture_output=True, env={**os.environ, **env, "ANALYSIS_ONLY": "1", "RESULTS": str(copy),
                                                 "PYTHON": sys.executable})
        assert (copy / "verdict.md").read_bytes() == (results / name / "verdict.md").read_bytes(), name


def test_heldout_script_on_a_small_slice_of_v2(tmp_path):
    """The whole script on one v2 subject, one prompt, one seed and two training steps: it trains, scores, writes
    the v2 verdict, and that verdict is what the analysis gives again from the runs it copied. Then MODEL=model_flow
    runs the same slice on the flow world: its own verdict, from samples that are not the UNet world's."""
    import subprocess

    script = str(REPO_ROOT / "examples" / "shapes_world" / "heldout.sh")
    samples = {}
    for model in ("", "model_flow"):
        results, out = tmp_path / f"results{model}", tmp_path / f"runs{model}"
        env = {**os.environ, "SPLIT": "heldout_v2", "OUT": str(out), "RESULTS": str(results),
               "PYTHON": sys.executable, "SUBJECTS_A": "green_circle", "SUBJECTS_B": "", "SEEDS": "0", "STEPS": "2",
               "TI_STEPS": "1 2", "PALP_STEPS": "1 2", "NUM_SAMPLES": "2", "PROMPT_INDICES": "0",
               "CONFIG": "PALP (paper)", "MODEL": str(REPO_ROOT / "examples" / "shapes_world" / model) if model else ""}
        subprocess.run(["bash", script], check=True, capture_output=True, env=env, timeout=900)
        verdict = (results / "verdict.md").read_text()
        assert verdict.startswith("## PALP (paper)@2 against TI+DB at its own best step count")
        assert "| prompt-alignment gain | TI+DB@" in verdict and "appearance ratio, probe B" in verdict
        assert (results / "table.md").is_file() and (results / "plot.png").is_file()
        samples[model] = {f.name: np.load(f)["steps2"] for f in Path(f"{out}_a").glob("samples_*.npz")}
        assert "samples_palp__paper_green_circle_p0_s0.npz" in samples[model]
        if not model:
            (results / "verdict.md").unlink()
            subprocess.run(["bash", script], check=True, capture_output=True, env={**env, "ANALYSIS_ONLY": "1"})
            assert (results / "verdict.md").read_text() == verdict
    assert samples[""].keys() == samples["model_flow"].keys()
    assert all(not np.array_equal(samples[""][name], samples["model_flow"][name]) for name in samples[""])


def test_only_configurations_without_the_alignment_term_share_one_run_across_prompts():
    """A run without the alignment term is trained once for all prompts; every PALP configuration, including the
    paper's (whose flags hold '--alignment_normalization none'), once per prompt."""
    import experiment

    free = {label for label, flags in experiment.CONFIGS.items() if experiment.is_prompt_free(flags)}
    assert free == {"TI+DB", "TI+DB 4 vectors"}
    assert not experiment.is_prompt_free(["--alignment_mode", "none", "--alignment_mode", "dds"])
    assert experiment.is_prompt_free(["--alignment_mode", "dds", "--alignment_mode", "none"])


def test_every_frontier_configuration_names_its_mechanism_and_strength():
    """frontier.sh's labels map to (mechanism, λ); a variant with other settings changed is not a point of a sweep."""
    assert analysis.mechanism_of("PALP (paper)") == ("paper's D", 1.0)
    assert analysis.mechanism_of("PALP λ=0.3") == ("paper's D", 0.3)
    assert analysis.mechanism_of("PALP normalised D") == ("normalised D", 1.0)
    assert analysis.mechanism_of("class-source DDS λ=0.6") == ("class-source DDS", 0.6)
    assert analysis.mechanism_of("D on the token only λ=2") == ("D on the token only", 2.0)
    assert analysis.mechanism_of("class-cancelling D λ=0.03") == ("class-cancelling D", 0.03)
    assert analysis.mechanism_of("PALP normalised D α=β=7.5") is None
    assert analysis.mechanism_of("TI+DB") is None
    assert analysis.mechanism_of("inverted teacher λ=3") == ("inverted teacher", 3.0)
    assert analysis.mechanism_of("identity-region D λ=0.6") == ("identity-region D", 0.6)
    assert analysis.mechanism_of("identity-projected D λ=0.6") == ("identity-projected D", 0.6)
    assert analysis.mechanism_of("multi-vector token (4 vectors) λ=0.3") == ("multi-vector token (4 vectors)", 0.3)
    assert analysis.mechanism_of("TI+DB 4 vectors") is None
    script = (REPO_ROOT / "examples" / "shapes_world" / "frontier.sh").read_text()
    for prefix in ("class-source DDS λ=", "D on the token only λ=", "calibrated D λ=", "PALP normalised D λ=",
                   "inverted teacher λ=", "identity-region D λ=", "multi-vector token (4 vectors) λ="):
        assert f'PREFIX="{prefix}"' in script, prefix


def test_frontier_leaves_a_sweep_point_with_missing_runs_out_of_the_summaries():
    """A λ whose runs are not all in yet is listed as incomplete, never chosen, and no curve goes through it."""
    rng = np.random.default_rng(0)
    pairs = [("checkered_star", 0), ("ringed_circle", 1), ("orange_square", 3), ("checkered_triangle", 4)]
    columns = ("prompt_alignment", "subject_fidelity", "appearance_fidelity", "b_appearance_fidelity")

    def row(config, subject, prompt, seed, steps, alignment, appearance):
        values = {"prompt_alignment": alignment, "subject_fidelity": appearance, "appearance_fidelity": appearance,
                  "b_appearance_fidelity": appearance}
        return {"config": config, "split": "dev", "subject": subject, "prompt_index": float(prompt),
                "train_seed": float(seed), "steps": float(steps),
                **{c: float(np.clip(values[c] + rng.normal(0, 0.01), 0, 1)) for c in columns}}

    rows = [row("TI+DB", s, p, seed, steps, 0.7, 0.8) for s, p in pairs for seed in (0, 1) for steps in (100, 200)]
    for weight, (alignment, appearance) in {"0.3": (0.75, 0.8), "1": (0.85, 0.6)}.items():
        rows += [row(f"PALP λ={weight}", s, p, seed, 100, alignment, appearance) for s, p in pairs for seed in (0, 1)]
    # λ = 0.6 looks best of all (more alignment, full appearance), but only 3 of its 8 runs are in.
    rows += [row("PALP λ=0.6", s, p, 0, 100, 0.95, 0.8) for s, p in pairs[:3]]
    points, baselines, summaries = analysis.frontier(rows, "TI+DB", (100, 200), num_resamples=200)
    incomplete = [p for p in points if not p["complete"]]
    assert [(p["weight"], p["runs"]) for p in incomplete] == [(0.6, 3)]
    (summary,) = summaries
    assert summary["weights"] == [0.3, 1.0]
    assert summary["best_eligible"]["weight"] == 0.3
    text = analysis.format_frontier(points, baselines, summaries)
    assert "| 3 (incomplete) |" in text and "PALP λ=0.6 at" not in text
