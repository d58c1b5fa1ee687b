"""The toy experiment's statistics (docs/toy.md): per evaluated step the mean over seeds ± half the min-max spread,
"SiT's final" = the mean over seeds of SiT's LAST evaluation (not its best), the step each seed first reaches it,
and the papers' form (step to reach a level, speed-up over SiT, a lower bound where SiT seeds never reach it).
Hand-computed on curves where mean != median and SiT's last evaluation is below its best."""
import json

import toy_experiment

# (step, joint accuracy) per (method, seed): SiT seed 0 peaks at step 200 (0.6) and ends at 0.5.
CURVES = {("sit", 0): [(100, 0.2), (200, 0.6), (300, 0.5)],
          ("sit", 1): [(100, 0.1), (200, 0.3), (300, 0.4)],
          ("sit", 2): [(100, 0.6), (200, 0.5), (300, 0.9)],
          ("repa", 0): [(100, 0.4), (200, 0.7), (300, 0.8)],
          ("repa", 1): [(100, 0.3), (200, 0.6), (300, 0.7)],
          ("repa", 2): [(100, 0.0), (200, 0.5), (300, 0.9)]}
# SiT's final = (0.5 + 0.4 + 0.9) / 3 = 0.6 (its best evaluations would give 0.633, the median of the last 0.5).


def _rows(text):
    return [r for r in text.splitlines() if r.startswith("| ")]


def test_accuracy_rows_are_seed_means_with_half_spreads_and_steps_to_sits_last_evaluation():
    text = toy_experiment.measure_tables(CURVES, ["sit", "repa"], [0, 1, 2], "joint accuracy", True)
    rows = _rows(text)
    assert rows[0] == "| method | 100 | 200 | 300 |"
    # SiT, step 100: (0.2 + 0.1 + 0.6) / 3 = 0.3, (0.6 - 0.1) / 2 = 0.25; step 200: 1.4 / 3, (0.6 - 0.3) / 2.
    assert rows[1] == "| SiT | 0.300 ± 0.250 | 0.467 ± 0.150 | 0.600 ± 0.250 |"
    # REPA, step 100: 0.7 / 3 = 0.233 (median 0.3), (0.4 - 0.0) / 2 = 0.2.
    assert rows[2] == "| REPA | 0.233 ± 0.200 | 0.600 ± 0.100 | 0.800 ± 0.100 |"
    assert "(0.600, the mean of SiT's last evaluation)" in text
    # Reaching 0.6: SiT seed 0 at step 200 (exactly 0.6), seed 1 never, seed 2 at step 100; REPA at 200, 200, 300
    # (mean 233.3). SiT's mean steps with its missing seed counted at the last step: (200 + 300 + 100) / 3 = 200,
    # so the speed-up is a bound, 200 / 233.3 = 0.86; the ranges overlap (REPA's 300 is after SiT's 100).
    assert rows[4] == "| SiT | 200, never, 100 | – | – | – |"
    assert rows[5] == "| REPA | 200, 200, 300 | 233 | >0.86x | no |"


def test_fd_rows_count_lower_as_better():
    fd = {("sit", 0): [(100, 5.0), (200, 2.0), (300, 1.0)], ("sit", 1): [(100, 6.0), (200, 3.0), (300, 2.0)],
          ("repa", 0): [(100, 1.2), (200, 0.8), (300, 0.6)], ("repa", 1): [(100, 2.0), (200, 1.4), (300, 1.1)]}
    text = toy_experiment.measure_tables(fd, ["sit", "repa"], [0, 1], "toy FD", False)
    rows = _rows(text)
    assert rows[1] == "| SiT | 5.500 ± 0.500 | 2.500 ± 0.500 | 1.500 ± 0.500 |"
    assert rows[2] == "| REPA | 1.600 ± 0.400 | 1.100 ± 0.300 | 0.850 ± 0.250 |"
    # SiT's final FD (1.0 + 2.0) / 2 = 1.5: SiT seed 0 at 300, seed 1 never (counted at 300): mean 300; REPA at 100
    # and 200 (1.4 <= 1.5): 150, so 300 / 150 = 2x, a bound; every REPA seed before any SiT seed: apart
    assert "(1.500, the mean of SiT's last evaluation)" in text
    assert rows[4] == "| SiT | 300, never | – | – | – |" and rows[5] == "| REPA | 100, 200 | 150 | >2.00x | yes |"


def test_summary_writes_both_measures_the_curves_and_the_pictures(tmp_path):
    curves = {k: {"toy_joint": v, "toy_fd": [(s, 1 - a) for s, a in v]} for k, v in CURVES.items()}
    text = toy_experiment.summarize(curves, ["sit", "repa"], [0, 1, 2], str(tmp_path))
    assert text.index("**toy FD**") < text.index("**joint accuracy**")  # the headline first
    assert (tmp_path / "table.md").read_text() == text
    assert json.loads((tmp_path / "curves.json").read_text())["sit-seed0"]["toy_joint"] == [[100, 0.2], [200, 0.6],
                                                                                            [300, 0.5]]
    assert (tmp_path / "fd.png").is_file() and (tmp_path / "joint_accuracy.png").is_file()


def test_a_curve_is_the_runs_logged_joint_accuracy_at_each_evaluation(tmp_path):
    lines = [{"step": 50, "loss": 1.0}, {"step": 100, "toy_colour": 0.9, "toy_shape": 0.5, "toy_joint": 0.45},
             {"step": 100, "loss": 0.8}, {"step": 200, "toy_joint": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    assert toy_experiment.read_curve(str(tmp_path)) == [(100, 0.45), (200, 0.7)]
    assert toy_experiment.read_curve(str(tmp_path), "toy_shape") == [(100, 0.5)]
