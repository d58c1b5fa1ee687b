"""The toy experiment's statistics (docs/toy.md): per evaluated step the mean over seeds ± half the min-max spread,
"SiT's final" = the mean over seeds of SiT's LAST evaluation (not its best), the step each seed first reaches it,
and the papers' form (step to reach a level, speed-up over SiT, a lower bound where SiT seeds never reach it).
Hand-computed on curves where mean != median and SiT's last evaluation is below its best."""
import json

import toy

# (step, joint accuracy) per (method, seed): SiT seed 0 peaks at step 200 (0.6) and ends at 0.5.
CURVES = {("sit", 0): [(100, 0.2), (200, 0.6), (300, 0.5)],
          ("sit", 1): [(100, 0.1), (200, 0.3), (300, 0.4)],
          ("sit", 2): [(100, 0.6), (200, 0.5), (300, 0.9)],
          ("repa", 0): [(100, 0.4), (200, 0.7), (300, 0.8)],
          ("repa", 1): [(100, 0.3), (200, 0.6), (300, 0.7)],
          ("repa", 2): [(100, 0.0), (200, 0.5), (300, 0.9)]}
# SiT's final = (0.5 + 0.4 + 0.9) / 3 = 0.6 (its best evaluations would give 0.633, the median of the last 0.5).


def test_summary_rows_are_seed_means_with_half_spreads_and_steps_to_sits_last_evaluation(tmp_path):
    text = toy.summarize(CURVES, ["sit", "repa"], [0, 1, 2], str(tmp_path))
    rows = text.splitlines()
    assert rows[0] == "| method | step 100 | step 200 | step 300 | steps to SiT's final (per seed) |"
    # SiT, step 100: (0.2 + 0.1 + 0.6) / 3 = 0.3, (0.6 - 0.1) / 2 = 0.25; step 200: 1.4 / 3, (0.6 - 0.3) / 2.
    # Reaching 0.6: seed 0 at step 200 (exactly 0.6), seed 1 never, seed 2 at step 100.
    assert rows[2] == "| SiT | 0.300 ± 0.250 | 0.467 ± 0.150 | 0.600 ± 0.250 | 200, never, 100 |"
    # REPA, step 100: 0.7 / 3 = 0.233 (median 0.3), (0.4 - 0.0) / 2 = 0.2.
    assert rows[3] == "| REPA | 0.233 ± 0.200 | 0.600 ± 0.100 | 0.800 ± 0.100 | 200, 200, 300 |"
    assert "SiT's final mean joint accuracy: 0.600" in text
    assert json.loads((tmp_path / "curves.json").read_text())["sit-seed0"] == [[100, 0.2], [200, 0.6], [300, 0.5]]
    assert (tmp_path / "table.md").read_text() == text


def test_speedup_rows_are_mean_steps_to_a_level_and_sits_over_the_methods():
    rows = toy.speedup_table(CURVES, ["sit", "repa"], [0, 1, 2], [0.3, 0.6, 0.9]).splitlines()[2:]
    # 0.3: SiT at 200, 200, 100 (mean 166.7, spread 50); REPA at 100, 100, 200 (133.3): 166.7 / 133.3 = 1.25.
    assert rows[0] == "| 0.300 | 167 ± 50 | 133 ± 50 | 1.25x |"
    # 0.6: SiT seed 1 never, counted at the last step 300 for a bound: (200 + 300 + 100) / 3 = 200; REPA 233.3.
    assert rows[1] == "| 0.600 | never in 1 of 3 seeds | 233 ± 50 | > 0.86x |"
    assert rows[2] == "| 0.900 | never in 2 of 3 seeds | never in 2 of 3 seeds | – |"


def test_a_curve_is_the_runs_logged_joint_accuracy_at_each_evaluation(tmp_path):
    lines = [{"step": 50, "loss": 1.0}, {"step": 100, "toy_colour": 0.9, "toy_shape": 0.5, "toy_joint": 0.45},
             {"step": 100, "loss": 0.8}, {"step": 200, "toy_joint": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    assert toy.read_curve(str(tmp_path)) == [(100, 0.45), (200, 0.7)]
    assert toy.read_curve(str(tmp_path), "toy_shape") == [(100, 0.5)]
