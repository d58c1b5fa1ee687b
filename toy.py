"""The toy experiment's command line (docs/toy.md); the toy world is toy_world.py, the experiment toy_experiment.py.

    python toy.py experiment [--design spatial] [--methods sit repa reg] [--seeds 0 1 2] [--jobs 2] [train.py flags]
    python toy.py encoders [--enc-type toy-vit toy-vit-dense]
"""
import sys

from plumbing import run_script
from toy_experiment import main

if __name__ == "__main__":
    sys.exit(run_script("toy.py", main))
