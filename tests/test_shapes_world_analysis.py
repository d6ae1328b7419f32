"""The held-out decision rule (examples/shapes_world/analysis.py) on synthetic runs with known answers."""

import sys

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
