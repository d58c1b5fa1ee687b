"""The commands printed in README.md and docs/*.md keep working as printed: each `python SCRIPT.py ...` /
`torchrun ... SCRIPT.py ...` line in a bash block parses with that script's own parser (every flag exists and
takes its value), and the cheap ones (--help) run. The toy commands a newcomer types first run in a fresh clone:
`python toy.py` with and without --help, and the shorter experiment of docs/toy.md, which is another
configuration than the committed runs."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import data
import evaluate
import plumbing
import sample
import toy_experiment
import toy_world
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train.py", "sample.py", "evaluate.py", "toy.py", "data.py")


def printed_commands():
    """(file, line, argv) of every command of ours in the bash blocks of README.md and docs/*.md, continuation
    lines joined, comments dropped, `S=...;` assignments substituted."""
    found = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        text = open(path).read()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                vars_ = dict(re.findall(r"^(\w+)=(\S+?);\s*", line))
                line = re.sub(r"^(\w+=\S+?;\s*)+", "", line)
                for k, v in vars_.items():
                    line = line.replace(f"${k}", v)
                if "$(" in line:  # a shell substitution: what it prints is not ours to check
                    continue
                words = shlex.split(line, comments=True)
                if not words or words[0] not in ("python", "torchrun"):
                    continue
                script = next((i for i, w in enumerate(words) if w in SCRIPTS), None)
                if script is not None:
                    found.append((os.path.relpath(path, ROOT), line.strip(), words[script], words[script + 1:]))
    return found


COMMANDS = printed_commands()


class Parsed(Exception):
    pass


def parse_only(monkeypatch, script, argv):
    """Parse argv with `script`'s own parser and stop there (nothing is loaded or run); returns what it parsed."""
    if script == "train.py":
        return train.parse_args(argv)
    if script == "sample.py":
        return sample.parse_args(argv)
    real = plumbing.ArgumentParser.parse_known_args

    def stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))
    monkeypatch.setattr(plumbing.ArgumentParser, "parse_known_args", stop)
    try:
        {"evaluate.py": evaluate.main, "toy.py": toy_experiment.main, "data.py": data.main}[script](argv)
    except Parsed as p:
        ns, extra = p.args[0]
    else:
        pytest.fail(f"{script} {argv} did not parse its flags")
    monkeypatch.undo()
    if script == "toy.py" and argv[0] == "experiment":  # the other flags go to train.py (with the preset)
        train.parse_args([*toy_experiment.METHOD_FLAGS["reg"], *extra])
    elif extra:
        pytest.fail(f"{script}: unrecognized {extra}")
    return ns


def test_the_docs_print_commands_of_every_script():
    assert {s for _, _, s, _ in COMMANDS} == set(SCRIPTS) and len(COMMANDS) >= 30


@pytest.mark.parametrize("doc, line, script, argv", COMMANDS, ids=[f"{d}: {l[:70]}" for d, l, _, _ in COMMANDS])
def test_each_printed_command_parses_as_printed(monkeypatch, capsys, doc, line, script, argv):
    if "--help" in argv or "-h" in argv:  # cheap: run it, all the way
        with pytest.raises(SystemExit) as e:
            code = {"toy.py": toy_experiment.main, "evaluate.py": evaluate.cli, "sample.py": sample.cli, "train.py": train.main,
                    "data.py": data.main}[script](argv)
            raise SystemExit(code)
        assert e.value.code in (0, None) and "usage:" in capsys.readouterr().out
        return
    try:
        parse_only(monkeypatch, script, argv)
    except SystemExit:
        pytest.fail(f"{doc}: `{line}` does not parse: {capsys.readouterr().err}")


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]])
def test_toy_py_with_no_command_or_help_prints_the_commands_and_exits_0(argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "toy.py"), *argv], capture_output=True, text=True,
                       timeout=120, cwd=ROOT) if argv == ["--help"] else None
    if r is not None:  # once as a real command line
        assert r.returncode == 0 and r.stderr == "" and "python toy.py experiment" in r.stdout
    assert toy_experiment.main(argv) == 0


def test_the_shorter_experiment_of_the_docs_runs_in_a_fresh_clone_into_its_own_folder(monkeypatch, tmp_path):
    # The committed runs (experiments/toy/sizes/*-seed0) trained the preset's 400 steps; --max-train-steps 200 is
    # another configuration: it goes to its own folder instead of being refused by theirs.
    line = next(argv for _, _, s, argv in COMMANDS if s == "toy.py" and "--max-train-steps" in argv)
    planned = []
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(toy_experiment, "prepare_toy_encoders", lambda runs: None)

    def stop(todo, jobs):
        planned.extend(todo)
        raise Parsed
    monkeypatch.setattr(toy_experiment, "run_trainings", stop)
    with pytest.raises(Parsed):
        toy_experiment.experiment_main(line[1:])
    out = os.path.join("experiments", "toy", "sizes-spatial-lambda2-max-train-steps-200")
    assert [name for name, _, _ in planned] == ["sit-seed0", "repa-seed0", "reg-seed0"]
    for name, flags, done in planned:
        assert done == os.path.join(out, name, "done.json")
        assert flags[flags.index("--output-dir") + 1] == out and flags[-2:] == ["--max-train-steps", "200"]
    assert not os.path.exists(out)  # planning wrote nothing


def test_a_finished_run_of_another_configuration_names_the_value_it_really_used(tmp_path):
    # The finished run was not given --max-train-steps: its args.json says what it trained (the preset's 400).
    run = tmp_path / "sit-seed0"
    run.mkdir()
    flags = ["--smoke=sit", "--seed", "0", "--output-dir", str(tmp_path), "--exp-name", "sit-seed0", "--toy-style",
             "sizes", "--sample-every", "50", "--num-sample-images", "256", "--sample-steps", "10"]
    (run / "done.json").write_text(json.dumps({"flags": flags}))
    (run / "args.json").write_text(json.dumps({"max_train_steps": 400, "seed": 0}))
    with pytest.raises(plumbing.UsageError) as e:
        toy_experiment.experiment_main(["--methods", "sit", "--seeds", "0", "--output-dir", str(tmp_path),
                             "--max-train-steps", "200"])
    assert "(--max-train-steps: not given (finished run; default: 400) vs '200' (now))" in str(e.value)
    assert "None" not in str(e.value)


def test_parallel_runs_train_the_toy_encoder_once_before_they_start_and_prefix_their_lines(tmp_path, monkeypatch,
                                                                                             capfd):
    monkeypatch.setenv("REPA_REG_CACHE", str(tmp_path / "cache"))
    trained, started = [], []

    def fake_train(grid_size, path, objective="class", style=None, log=print):
        trained.append((grid_size, objective, style))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    monkeypatch.setattr(toy_world, "train_toy_encoder", fake_train)
    # each "training" prints two lines and says whether the encoder was cached when it started
    script = tmp_path / "fake_train.py"
    script.write_text("import os, sys\na = sys.argv\nprint('first line of', a[-1])\n"
                      "os.makedirs(os.path.join(a[a.index('--output-dir') + 1], a[a.index('--exp-name') + 1]))\n"
                      f"print('cached:', os.path.isfile({str(toy_world.encoders.toy_encoder_path(4, 'class', 'sizes'))!r}))\n")
    monkeypatch.setattr(toy_experiment, "TRAIN_PY", str(script))
    real_start = toy_experiment.start_training

    def start(flags, env=None, name=None):
        started.append(len(trained))
        return real_start(flags + [name], env, name)
    monkeypatch.setattr(toy_experiment, "start_training", start)
    monkeypatch.setattr(toy_experiment, "read_curve", lambda exp_dir, key: [(100, 0.5)])
    monkeypatch.setattr(toy_experiment, "summarize", lambda *a, **k: "")
    toy_experiment.experiment_main(["--methods", "sit", "repa", "reg", "--seeds", "0", "--jobs", "2", "--output-dir",
                         str(tmp_path / "out")])
    assert trained == [(4, "class", "sizes")] and started == [1, 1, 1]  # once, before the first run started
    out = capfd.readouterr().out
    for name in ("sit-seed0", "repa-seed0", "reg-seed0"):
        assert f"[{name}] first line of {name}\n" in out and f"[{name}] cached: True\n" in out
    assert all(line.startswith(("[", "===", "experiment finished")) for line in out.splitlines() if line), out
