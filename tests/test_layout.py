"""The import graph runs one way: scripts on top, equations and building blocks below (README, 'How the code is
laid out'). Read from the source with ast, so a lazy import inside a function counts too."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What each file may import of ours; anything else points up (or sideways) and makes a cycle possible.
ALLOWED = {
    # scripts
    "train": {"run_folder", "checkpoints", "monitor", "profiling", "sample", "data", "toy_world", "losses", "model",
              "encoders", "plumbing"},
    "evaluate": {"toy_experiment", "toy_world", "losses", "model", "encoders", "inception", "frechet", "plumbing"},
    "toy": {"toy_experiment", "plumbing"},
    # the toy experiment (run by toy.py), below the scripts: it starts train.py as a process, never imports it
    "toy_experiment": {"toy_world", "encoders", "plumbing"},
    "sample": {"toy_world", "losses", "model", "encoders", "plumbing"},
    # run management (train.py's)
    "run_folder": {"checkpoints", "plumbing"},
    "monitor": {"checkpoints", "sample", "toy_world", "encoders", "plumbing"},
    "checkpoints": {"model", "encoders", "plumbing"},
    "profiling": {"plumbing"},
    # data and the toy world
    "data": {"toy_world", "encoders", "plumbing"},
    "toy_world": {"encoders", "frechet", "plumbing"},
    # equations and building blocks
    "losses": set(),
    "model": {"plumbing"},
    "encoders": {"plumbing"},
    "inception": {"plumbing"},
    "frechet": {"plumbing"},
    # what every file shares
    "plumbing": set(),
}


def project_imports(name):
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def test_every_module_has_a_place():
    # a new top-level file must be given its place in the graph above, or its imports go unchecked
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert modules == set(ALLOWED)


def test_imports_only_point_down():
    upward = {name: sorted(project_imports(name) - allowed) for name, allowed in ALLOWED.items()}
    assert upward == {name: [] for name in ALLOWED}


def test_the_allowed_graph_has_no_cycle():
    # a file may only import files strictly below it: ordering them by the graph must succeed
    import graphlib
    order = list(graphlib.TopologicalSorter(ALLOWED).static_order())
    assert order[0] in ("losses", "plumbing") and set(order) == set(ALLOWED)
