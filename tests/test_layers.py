"""Dependencies point one way: core <- data <- training <- eval <- apps.

* core: ``cheers.models`` and the root modules (config, tokens, flow, sampling, processor, checkpoint,
  generation, pipeline, assets, web_plots, ...): the model and how to run it;
* data: ``cheers.data`` (release records, ShapesWorld, sources, samples, collation, the loader);
* training: ``cheers.training`` (recipes, the loop, hooks as a mechanism);
* eval: ``cheers.eval`` (benchmarks, ShapesBench, the ladder and ablations, which train; the training hooks
  that measure the model);
* apps: ``cheers.cli``, ``cheers.web``, ``cheers.__main__``, ``cheers.serve`` and every ``*.cli`` module: they
  compose the layers (``cheers train`` passes :mod:`cheers.eval.train_hooks` to the trainer).

Every module under src/cheers is parsed with ``ast``, imports inside functions included; string imports
(``cheers.cli``'s optional commands, ``cheers.__init__``'s lazy exports) are not followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = ("core", "data", "training", "eval", "apps")
APP_MODULES = ("cheers.__main__", "cheers.cli", "cheers.web", "cheers.serve")

# (importer, imported): why this upward edge is accepted; each must still exist (stale entries fail).
# None today.
ALLOWED: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> int:
    """The layer index of a dotted ``cheers`` module name (see the module docstring)."""
    parts = module.split(".")
    if parts[-1] == "cli" or any(module == m or module.startswith(m + ".") for m in APP_MODULES):
        return LAYERS.index("apps")
    if len(parts) > 1 and parts[1] in ("data", "training", "eval"):
        return LAYERS.index(parts[1])
    return LAYERS.index("core")


def module_names(src: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``src/cheers`` (packages by their ``__init__``)."""
    out = {}
    for path in sorted((src / "cheers").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) of every ``cheers`` import in ``path``, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from cheers import checkpoint` imports the module cheers.checkpoint
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in known else base))
    return [
        (line, name) for line, name in dict.fromkeys(found) if name == "cheers" or name.startswith("cheers.")
    ]


def upward_imports(src: Path) -> tuple[list[str], set[tuple[str, str]]]:
    """Messages naming each upward import not in ALLOWED, and the ALLOWED edges that were seen."""
    modules = module_names(src)
    errors, used = [], set()
    for module, path in modules.items():
        for line, imported in imports_of(module, path, set(modules)):
            mine, theirs = layer_of(module), layer_of(imported)
            if theirs <= mine:
                continue
            if (module, imported) in ALLOWED:
                used.add((module, imported))
                continue
            errors.append(
                f"{path.relative_to(src.parent)}:{line}: {module} ({LAYERS[mine]}) imports {imported} "
                f"({LAYERS[theirs]})"
            )
    return errors, used


def test_no_module_imports_a_higher_layer():
    errors, used = upward_imports(SRC)
    assert not errors, "upward imports (core <- data <- training <- eval <- apps):\n" + "\n".join(errors)
    assert used == set(ALLOWED), f"ALLOWED edges no longer in the code, remove them: {set(ALLOWED) - used}"


def test_layer_map():
    assert [
        LAYERS[layer_of(m)]
        for m in (
            "cheers",
            "cheers.pipeline",
            "cheers.models.cheers",
            "cheers.web_plots",
            "cheers.assets",
            "cheers.data.loader",
            "cheers.data.shapes.world",
            "cheers.training.loop",
            "cheers.eval.train_hooks",
        )
    ] == ["core", "core", "core", "core", "core", "data", "data", "training", "eval"]
    assert {
        LAYERS[layer_of(m)]
        for m in (
            "cheers.cli",
            "cheers.__main__",
            "cheers.web",
            "cheers.training.cli",
            "cheers.eval.cli",
            "cheers.data.shapes.cli",
            "cheers.serve.app",
        )
    } == {"apps"}


def test_the_check_sees_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "src" / "cheers"
    (pkg / "training").mkdir(parents=True)
    (pkg / "eval").mkdir()
    for f in ("__init__.py", "training/__init__.py", "eval/__init__.py", "eval/score.py", "flow.py"):
        (pkg / f).write_text("")
    (pkg / "training" / "hooks.py").write_text(
        "from cheers import flow\n\n\ndef f():\n    from ..eval import score\n    return score\n"
    )
    errors, _ = upward_imports(tmp_path / "src")
    assert errors == [
        "src/cheers/training/hooks.py:5: cheers.training.hooks (training) imports cheers.eval.score (eval)"
    ]
