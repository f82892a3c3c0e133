"""Recipes and compare: shipped recipes validate, a tiny pipeline runs, reruns skip, errors are all listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlkit.cli import app
from dlkit.compare import pareto
from dlkit.errors import DlkitError
from dlkit.recipes import RecipeError, load_recipe, run_recipe
from dlkit.steps import FloorNotMet

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.steps
    assert path.read_text().startswith("#"), "each recipe opens with a comment saying what it shows"


def test_bad_recipe_reports_every_problem_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\n"                                   # 1
        "colour: blue\n"                                # 2
        "steps:\n"                                      # 3
        "  - train:\n"                                  # 4
        "      model: mlp\n"                            # 5
        "      epochs: many\n"                          # 6
        "      optimiser: sgd\n"                        # 7
        "      precision: fp8\n"                        # 8
        "  - distil: {}\n"                              # 9
        "  - prune: {ratio: 0.5}\n"                     # 10
        "    input: nowhere\n"                          # 11
    )
    with pytest.raises(RecipeError) as exc:
        load_recipe(bad)
    problems = exc.value.problems
    text = "\n".join(problems)
    assert "line 2: unknown key 'colour'" in text
    assert "line 6: train epochs='many' should be an integer" in text
    assert "line 7: 'train' has no option 'optimiser'" in text
    assert "line 8: train precision='fp8' should be one of fp32, bf16" in text
    assert "line 9: unknown command 'distil'" in text
    assert "input 'nowhere' is not an earlier step's id" in text
    assert len(problems) == 6
    res = run("run", bad, "--dry-run")
    assert res.exit_code == 2 and "6 problems" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_invalid_yaml_and_bad_override(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("steps:\n  - train: {model: mlp\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    res = run("run", RECIPES[0], "--set", "nosuchstep.epochs=1", "--dry-run")
    assert res.exit_code == 2 and "no step 'nosuchstep'" in res.stderr


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    res = run("run", "recipes/tiny.yaml", "--dry-run", "--json", "--out", tmp_path / "r")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert [s["command"] for s in plan["steps"]] == ["train", "prune", "quantize", "evaluate", "compare"]
    assert plan["steps"][0]["options"]["seed"] == 0  # defaults applied
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "tiny"
    res = run("run", "recipes/tiny.yaml", "--out", out, "--json", "--quiet")
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


def test_tiny_recipe_runs_end_to_end(tiny_run):
    out, doc = tiny_run
    assert [s["status"] for s in doc["steps"]] == ["ran"] * 5
    for name in ("base", "prune", "quantize"):
        assert (out / name / "manifest.json").is_file()
    lineage = json.loads((out / "quantize" / "manifest.json").read_text())["lineage"]
    assert [s["step"] for s in lineage] == ["train", "prune", "quantize"]
    compare = json.loads((out / "compare.json").read_text())
    assert [Path(r["artifact"]).name for r in compare["rows"]] == ["base", "prune", "quantize"]
    base, pruned, _ = compare["rows"]
    assert pruned["params"] < base["params"] and pruned["macs"] < base["macs"]
    assert pruned["ratios"]["macs"] == pytest.approx(pruned["macs"] / base["macs"])
    evaluation = json.loads((out / "evaluate.json").read_text())
    assert 0 <= evaluation["accuracy"] <= 1


def test_rerun_skips_finished_steps_and_reruns_changed_ones(tiny_run):
    out, _ = tiny_run
    stamp = (out / "base" / "model.safetensors").stat().st_mtime_ns
    res = run("run", "recipes/tiny.yaml", "--out", out, "--json", "--quiet")
    assert res.exit_code == 0, res.output
    assert [s["status"] for s in json.loads(res.stdout)["steps"]] == ["skipped"] * 5
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    # a changed option reruns its step and every step downstream of it
    res = run("run", "recipes/tiny.yaml", "--out", out, "--json", "--quiet", "--set", "quantize.seed=1")
    assert res.exit_code == 0, res.output
    assert [s["status"] for s in json.loads(res.stdout)["steps"]] == ["skipped", "skipped", "ran", "ran", "ran"]


def test_compare_cli_floors_csv_and_plot(tiny_run, tmp_path):
    out, _ = tiny_run
    res = run("compare", out / "base", out / "prune", "--csv", "--rounds", "1", "--plot", tmp_path / "p.png",
              "--fail-under", "accuracy=1.01")
    assert res.exit_code == 1
    assert "below the floor" in res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("artifact,model,step,accuracy") and len(lines) == 3
    assert (tmp_path / "p.png").stat().st_size > 1000
    res = run("compare", "-", "--json", "--rounds", "1", "--quiet", input=f"{out / 'base'}\n")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"][0]["ratios"]["params"] == 1.0
    res = run("compare", out / "base", "--fail-under", "speed=2")
    assert res.exit_code == 2 and "METRIC=VALUE" in res.stderr


def test_compare_floor_in_a_recipe_is_an_error_not_an_exit(tiny_run, tmp_path):
    out, _ = tiny_run
    recipe = tmp_path / "floor.yaml"
    recipe.write_text("# a floor no artifact meets\nsteps:\n"
                      f"  - compare: {{artifacts: [{out / 'base'}], rounds: 1, fail-under: [accuracy=1.01]}}\n")
    with pytest.raises(FloorNotMet) as exc:
        run_recipe(load_recipe(recipe), tmp_path / "run")
    assert isinstance(exc.value, DlkitError) and len(exc.value.failures) == 1
    assert json.loads((tmp_path / "run" / "compare.json").read_text())["failures"] == exc.value.failures
    res = run("run", recipe, "--out", tmp_path / "run", "--quiet")  # not marked done: it runs and fails again
    assert res.exit_code == 1 and "1 artifact(s) below the floor" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_pareto_front():
    # (cost, accuracy): the third is dominated by the first (cheaper and as accurate)
    assert pareto([(1.0, 0.9), (2.0, 0.95), (3.0, 0.9), (0.5, 0.5)]) == [True, True, False, True]
