"""plait's packages form layers and every import points down (or stays in its package):

    cli                         the command line
    recipes                     short scripts that compose the parts (rl, sft, evaluate)
    evals                       eval sets (pass@k, maj@k) and bias probes on a session
    runtime                     batch sources per placement, roles, launchers, transport
    train                       update loop, forward passes, models on a rank, checkpoints
    rollout, rewards, parallel  generation engines; reward functions; collectives, FSDP
    models                      loading and building models
    config, telemetry           settings; metrics, plots, progress
    algos, data                 pure RL math; datasets and tasks
    errors                      the user-fixable error types

Every import counts, also those inside functions: a lazy import still ties the
layers together. No module may be part of an import cycle either."""

import ast
from pathlib import Path

import plait

SOURCE = Path(plait.__file__).parent
LAYERS = {
    "errors": 0, "__init__": 0,
    "algos": 1, "data": 1,
    "config": 2, "telemetry": 2,
    "models": 3,
    "rollout": 4, "rewards": 4, "parallel": 4,
    "train": 5,
    "runtime": 6,
    "evals": 7,
    "recipes": 8,
    "cli": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Each plait module and the plait modules it imports (anywhere in its body)."""
    modules = {_module_name(p): p for p in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from plait.x import y` may name a submodule y or an attribute of x
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t if t in modules else node.module for t in targets]
            else:
                continue
            found.update(t for t in targets if t.split(".")[0] == "plait" and t != name)
        graph[name] = {t for t in found if t in modules}
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    assert {_package(m) for m in _imports()} <= set(LAYERS)


def test_imports_point_down():
    upward = sorted(f"{module} -> {target}" for module, targets in _imports().items()
                    for target in targets
                    if _package(target) != _package(module)
                    and LAYERS[_package(target)] >= LAYERS[_package(module)])
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _imports()
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule is not vacuous: a module of a lower layer importing a higher one fails."""
    fake = tmp_path / "plait"
    (fake / "algos").mkdir(parents=True)
    (fake / "recipes").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "algos" / "__init__.py").write_text("")
    (fake / "recipes" / "__init__.py").write_text("")
    (fake / "recipes" / "rl.py").write_text("X = 1\n")
    (fake / "algos" / "bad.py").write_text("def f():\n    from plait.recipes.rl import X\n")
    monkeypatch.setattr(__import__(__name__), "SOURCE", fake)
    graph = _imports()
    assert graph["plait.algos.bad"] == {"plait.recipes.rl"}
