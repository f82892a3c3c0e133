"""The step table: the library never imports the CLI, the CLI and the table agree on every option,
and a recipe step returns what the library function returns for the same options."""

from __future__ import annotations

import ast
import inspect
import json
import typing
from pathlib import Path

import pytest

from dlkit.recipes import load_recipe, run_recipe
from dlkit.steps import STEPS, option_key

PACKAGE = Path(__file__).resolve().parent.parent / "dlkit"
CLI_ONLY = {"json", "quiet", "debug", "csv", "nproc", "plot"}  # how output is shown, or how a run is launched


def _imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, relative imports made absolute."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_the_library_never_imports_the_cli():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in ("cli", "__main__.py"):  # the program, not the library
            continue
        bad = sorted(m for m in _imported_modules(path) if m == "dlkit.cli" or m.startswith("dlkit.cli."))
        if bad:
            offenders[str(path.relative_to(PACKAGE.parent))] = bad
    assert not offenders
    assert "dlkit.steps" in _imported_modules(PACKAGE / "recipes.py")  # the scan does see imports


def _cli_parameters(command: str) -> dict[str, tuple[typing.Any, typing.Any, typing.Any]]:
    """name -> (type, default, typer info) of a command's Typer parameters."""
    import importlib

    fn = getattr(importlib.import_module(f"dlkit.cli.{command}"), command)
    fn = getattr(fn, "__wrapped__", fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    out = {}
    for name, param in inspect.signature(fn).parameters.items():
        base, *meta = typing.get_args(hints[name])
        out[name] = (base, param.default, meta[0])
    return out


@pytest.mark.parametrize("command", list(STEPS))
def test_cli_and_step_table_take_the_same_options(command):
    spec = STEPS[command]
    cli = _cli_parameters(command)
    table = spec.types()
    defaults = {name: p.default for name, p in spec.options().items()}
    inputs = {spec.input_key} if spec.input_key else set()
    assert set(table) <= set(cli), "a step option the command does not take"
    assert set(cli) - set(table) - inputs <= CLI_ONLY, "a command option the step table does not know"
    for name, tp in table.items():
        cli_type, cli_default, info = cli[name]
        assert cli_type == tp, name
        if defaults[name] is not inspect.Parameter.empty:
            assert cli_default == defaults[name], name
        longs = [d.split("/")[0][2:] for d in (info.param_decls or ()) if d.startswith("--")]
        assert option_key(name) == (longs[0] if longs else option_key(name)), "a recipe key is the long option"


def test_dlkit_run_shows_every_step_as_its_command_does():
    from dlkit.cli.run import REPORTS

    assert set(REPORTS) == set(STEPS)


def test_recipe_step_returns_what_the_library_function_returns(tmp_path):
    from dlkit.profiling import ProfileOptions, profile_target

    recipe = tmp_path / "profile.yaml"
    recipe.write_text("# one profile\nsteps:\n"
                      "  - profile: {target: mlp, batch-size: 4, latency: false, measure: false, device: cpu,\n"
                      "              set: {hidden: 32}}\n")
    run = run_recipe(load_recipe(recipe), tmp_path / "run")
    assert [s.status for s in run.steps] == ["ran"]
    report = json.loads((tmp_path / "run" / "profile.json").read_text())
    direct = profile_target("mlp", ProfileOptions(batch_size=4, latency=False, measure=False, device="cpu",
                                                  overrides={"hidden": "32"}))
    assert report == json.loads(json.dumps(direct.to_dict(), default=str))
    assert report["params"]["total"] == 784 * 32 + 32 + 32 * 10 + 10
    again = run_recipe(load_recipe(recipe), tmp_path / "run")
    assert [s.status for s in again.steps] == ["skipped"]


def test_values_are_converted_once_to_the_options_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# types\nsteps:\n"
                      "  - train: {model: mlp, dataset: digits, lr: 1, set: {hidden: 32}, data-dir: /data}\n"
                      "  - prune: {ratio: 0.5, global: true, protect: features.0}\n")
    train, prune = load_recipe(recipe).steps
    assert train.values["lr"] == 1.0 and isinstance(train.values["lr"], float)
    assert train.values["set_"] == ["hidden=32"] and train.values["data_dir"] == Path("/data")
    assert prune.values == {"ratio": 0.5, "global_": True, "protect": ["features.0"]}
    _, opts = STEPS["prune"].build("art", **prune.values)
    assert opts.global_pruning is True and opts.protect == ("features.0",)
