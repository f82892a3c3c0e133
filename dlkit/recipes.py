"""Recipes: a YAML list of steps (train, prune, quantize, evaluate, profile, compare), run in order.

    # what this recipe shows, how long it takes
    name: cnn-compress
    defaults:              # options given to every step whose command takes them
      seed: 0
    steps:
      - train: {model: cnn, dataset: fashion-mnist, epochs: 5}
        id: base
      - prune: {ratio: 0.5, finetune-epochs: 1}
      - quantize: {mode: static}
      - compare: {artifacts: [base, prune, quantize]}

Options are spelled exactly as on the command line, without the dashes (``batch-size``,
``finetune-epochs``, ``set``). They are checked against the commands' own signatures, so a recipe
accepts what the CLI accepts and nothing else; every problem is reported at once with its line.
A step's input is the previous step's artifact unless ``input:`` names an earlier step's id or a
path. Steps call the library functions the CLI calls (no shelling out); their artifacts go under
the run folder, and a rerun skips steps whose options and inputs are unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlkit.errors import UsageError

# command -> (module, function) of its CLI entry point: the source of truth for its options
COMMANDS = {
    "train": ("dlkit.cli.train", "train"),
    "evaluate": ("dlkit.cli.evaluate", "evaluate"),
    "profile": ("dlkit.cli.profile", "profile"),
    "prune": ("dlkit.cli.prune", "prune"),
    "quantize": ("dlkit.cli.quantize", "quantize"),
    "compare": ("dlkit.cli.compare", "compare"),
}
# Options the runner owns: where outputs go, and how they are shown.
RUNNER_OPTIONS = {"out", "json", "quiet", "debug", "resume", "csv", "nproc", "plot"}
# Commands whose result is an artifact (the others write a JSON report).
MAKES_ARTIFACT = {"train", "prune", "quantize"}
TOP_KEYS = {"name", "description", "defaults", "steps"}


class RecipeError(UsageError):
    """A recipe with problems; ``problems`` lists them all as 'line N: ...'."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}: " + "; ".join(problems),
                         hint="fix them and check again with --dry-run")


# ----------------------------------------------------------------------------------------------
# Command signatures


@dataclass(frozen=True)
class OptionSpec:
    key: str  # the recipe key: the long option without dashes
    param: str  # the Python parameter name of the CLI function
    annotation: Any
    positional: bool = False


def command_options(command: str) -> dict[str, OptionSpec]:
    """The options a command takes, read off its CLI function's signature."""
    module, func = COMMANDS[command]
    fn = getattr(importlib.import_module(module), func)
    fn = getattr(fn, "__wrapped__", fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    specs = {}
    for name, hint in hints.items():
        if name == "return" or typing.get_origin(hint) is not typing.Annotated:
            continue
        base, *meta = typing.get_args(hint)
        info = next((m for m in meta if type(m).__name__ in ("OptionInfo", "ArgumentInfo")), None)
        if info is None:
            continue
        positional = type(info).__name__ == "ArgumentInfo"
        decls = list(getattr(info, "param_decls", None) or ())
        if isinstance(info.default, str) and info.default.startswith("-"):
            decls.insert(0, info.default)
        longs = [d.split("/")[0] for d in decls if d.startswith("--")]
        key = longs[0][2:] if longs else name.rstrip("_").replace("_", "-")
        if key in RUNNER_OPTIONS:
            continue
        specs[key] = OptionSpec(key=key, param=name, annotation=base, positional=positional)
    return specs


def check_value(value: Any, annotation: Any) -> str | None:
    """None if ``value`` fits the CLI annotation, else what was expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_value(value, inner[0]) if len(inner) == 1 else None
    if origin is typing.Literal:
        return None if value in args else "one of " + ", ".join(map(str, args))
    if origin is list:
        if isinstance(value, dict):  # `set: {hidden: 256}` stands for `--set hidden=256`
            value = [f"{k}={v}" for k, v in value.items()]
        items = value if isinstance(value, list) else [value]
        for item in items:
            problem = check_value(item, args[0] if args else str)
            if problem:
                return f"a list of {problem}"
        return None
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if annotation in (str, Path):
        return None if isinstance(value, (str, int, float)) and not isinstance(value, bool) else "a string"
    return None


# ----------------------------------------------------------------------------------------------
# Loading with line numbers


def _to_python(node) -> tuple[Any, Any]:
    """(value, lines): lines mirrors value with each mapping key's line (1-based)."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        value, lines = {}, {}
        for k, v in node.value:
            key = yaml.safe_load(yaml.serialize(k)) if not isinstance(k, yaml.ScalarNode) else k.value
            value[key], sub = _to_python(v)
            lines[key] = (k.start_mark.line + 1, sub)
        return value, lines
    if isinstance(node, yaml.SequenceNode):
        pairs = [_to_python(v) for v in node.value]
        return [p[0] for p in pairs], [(v.start_mark.line + 1, p[1]) for v, p in zip(node.value, pairs)]
    loader = yaml.SafeLoader("")
    return loader.construct_object(node, deep=True), None


@dataclass
class Step:
    id: str
    command: str
    options: dict[str, Any]
    input: str | None
    line: int


@dataclass
class Recipe:
    path: Path
    name: str
    description: str
    steps: list[Step] = field(default_factory=list)

    def plan(self) -> list[dict]:
        return [{"id": s.id, "command": s.command, "input": s.input, "options": s.options} for s in self.steps]


def _parse_override(text: str) -> tuple[str, str, Any]:
    import yaml

    key, sep, raw = text.partition("=")
    step, dot, option = key.partition(".")
    if not sep or not dot or not step or not option:
        raise UsageError(f"--set {text!r} is not step.option=value", hint="e.g. --set train.epochs=1")
    return step.strip(), option.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe; raises RecipeError listing every problem with its line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror}", hint="check the path") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if node is None:
        raise RecipeError(str(path), ["line 1: the recipe is empty"])
    doc, lines = _to_python(node)
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise RecipeError(str(path), ["line 1: a recipe is a mapping with 'steps' (and optional name, defaults)"])
    for key in doc:
        if key not in TOP_KEYS:
            problems.append(f"line {lines[key][0]}: unknown key '{key}' (expected {', '.join(sorted(TOP_KEYS))})")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(f"line {lines['defaults'][0]}: 'defaults' must be a mapping of option: value")
        defaults = {}
    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.append(f"line {lines['steps'][0] if 'steps' in lines else 1}: 'steps' must be a non-empty list")
        raise RecipeError(str(path), problems)

    parsed = []
    seen_ids: dict[str, int] = {}
    for i, (raw, (line, sub)) in enumerate(zip(raw_steps, lines["steps"][1])):
        if not isinstance(raw, dict):
            problems.append(f"line {line}: a step is a mapping like `train: {{model: cnn}}`")
            continue
        commands = [k for k in raw if k not in ("id", "input")]
        if len(commands) != 1:
            problems.append(f"line {line}: a step names exactly one command (got {', '.join(map(str, commands)) or 'none'})")
            continue
        command = commands[0]
        if command not in COMMANDS:
            problems.append(f"line {sub[command][0]}: unknown command '{command}' (known: {', '.join(COMMANDS)})")
            continue
        opts = raw[command] if raw[command] is not None else {}
        if not isinstance(opts, dict):
            problems.append(f"line {sub[command][0]}: the options of '{command}' must be a mapping")
            continue
        step_id = str(raw.get("id", command))
        if step_id in seen_ids:
            if "id" in raw:
                problems.append(f"line {sub['id'][0]}: step id '{step_id}' is used twice (first on line {seen_ids[step_id]})")
                continue
            step_id = f"{command}-{i + 1}"
        seen_ids[step_id] = line
        opt_lines = {k: v[0] for k, v in (sub[command][1] or {}).items()}
        parsed.append((Step(step_id, command, dict(opts), raw.get("input"), line), opt_lines, defaults))

    steps_by_id = {s.id: s for s, _, _ in parsed}
    for override in overrides or []:
        step_id, option, value = _parse_override(override)
        if step_id not in steps_by_id:
            problems.append(f"--set {override}: no step '{step_id}' (steps: {', '.join(steps_by_id)})")
            continue
        steps_by_id[step_id].options[option] = value

    earlier: list[str] = []
    for step, opt_lines, defaults in parsed:
        try:
            specs = command_options(step.command)
        except ImportError:
            problems.append(f"line {step.line}: command '{step.command}' is not available in this dlkit")
            continue
        for key, value in defaults.items():
            if key in specs and key not in step.options and not specs[key].positional:
                step.options[key] = value
        for key, value in step.options.items():
            where = f"line {opt_lines.get(key, step.line)}"
            if key in RUNNER_OPTIONS:
                problems.append(f"{where}: '{key}' is set by `dlkit run` itself; remove it")
                continue
            spec = specs.get(key.lstrip("-"))
            if spec is None:
                problems.append(f"{where}: '{step.command}' has no option '{key}' "
                                f"(it takes: {', '.join(sorted(specs))})")
                continue
            problem = check_value(value, spec.annotation)
            if problem:
                problems.append(f"{where}: {step.command} {key}={value!r} should be {problem}")
        step.options = {k.lstrip("-"): v for k, v in step.options.items()}
        for key, spec in specs.items():
            required = spec.positional and key not in ("artifact", "artifacts", "target")
            if required and key not in step.options:
                problems.append(f"line {step.line}: '{step.command}' needs '{key}'")
        if step.input is not None and step.input not in earlier and "/" not in str(step.input):
            problems.append(f"line {step.line}: input '{step.input}' is not an earlier step's id "
                            f"(earlier: {', '.join(earlier) or 'none'}) nor a path")
        needs_input = step.command in ("evaluate", "prune", "quantize") or (
            step.command == "profile" and "target" not in step.options)
        if needs_input and step.input is None and not any(
                s.command in MAKES_ARTIFACT for s in steps_by_id.values() if s.id in earlier):
            problems.append(f"line {step.line}: '{step.command}' needs an artifact, but no earlier step makes one "
                            "(add a train step, or input: PATH)")
        earlier.append(step.id)
    if problems:
        raise RecipeError(str(path), problems)
    return Recipe(path=path, name=str(doc.get("name") or path.stem), description=str(doc.get("description") or ""),
                  steps=[s for s, _, _ in parsed])


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Running


STATE_FILE = "run.json"


@dataclass
class StepOutcome:
    id: str
    command: str
    status: str  # "ran" or "skipped"
    output: str  # the artifact folder, or the JSON report
    seconds: float
    result: dict


@dataclass
class RunResult:
    recipe: str
    folder: Path
    steps: list[StepOutcome]

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "folder": str(self.folder),
                "steps": [vars(s) | {"result": s.result} for s in self.steps]}

    @property
    def artifacts(self) -> list[str]:
        return [s.output for s in self.steps if s.command in MAKES_ARTIFACT]


def _raw_command(command: str):
    module, func = COMMANDS[command]
    fn = getattr(importlib.import_module(module), func)
    return getattr(fn, "__wrapped__", fn)


def _cli_value(value: Any, annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return value if value is None else _cli_value(value, inner[0])
    if origin is list:
        if isinstance(value, dict):  # `set: {hidden: 256}` reads better than a list of "k=v"
            return [f"{k}={v}" for k, v in value.items()]
        return [_cli_value(v, args[0] if args else str) for v in (value if isinstance(value, list) else [value])]
    if annotation is Path:
        return Path(str(value))
    if annotation is str and not isinstance(value, str):
        return str(value)
    if annotation is float and isinstance(value, int):
        return float(value)
    return value


def _manifest_digest(path: str) -> str:
    try:
        return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def _complete(command: str, output: str) -> bool:
    from dlkit import artifacts
    from dlkit.errors import DlkitError

    if command not in MAKES_ARTIFACT:
        return Path(output).is_file()
    try:
        artifacts.read_artifact(output)
    except DlkitError:
        return False
    return True


def run_recipe(recipe: Recipe, folder: Path, *, quiet: bool = False, on_step=None) -> RunResult:
    """Run every step in order under ``folder``; skip steps already done with the same inputs."""
    import contextlib
    import io
    import shutil
    import time

    from dlkit import artifacts

    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
    except json.JSONDecodeError:
        state = {}
    done: dict = state.setdefault("steps", {})
    outputs: dict[str, str] = {}
    last_artifact: str | None = None
    outcomes = []
    for index, step in enumerate(recipe.steps):
        specs = command_options(step.command)
        kwargs = {specs[k].param: _cli_value(v, specs[k].annotation) for k, v in step.options.items()}
        source = outputs.get(step.input, step.input) if step.input is not None else last_artifact
        inputs: list[str] = []
        positional = [s for s in specs.values() if s.positional and s.key not in step.options]
        if step.command == "compare":
            inputs = [outputs.get(str(a), str(a)) for a in step.options.get("artifacts", [])] or [
                outputs[s.id] for s in recipe.steps[:index] if s.command in MAKES_ARTIFACT]
            kwargs[specs["artifacts"].param] = inputs
        elif positional and source is not None:
            inputs = [source]
            kwargs[positional[0].param] = source
        output = folder / (step.id if step.command in MAKES_ARTIFACT else f"{step.id}.json")
        key = fingerprint(step.command, step.options, [_manifest_digest(p) for p in inputs])
        if on_step:
            on_step(index, step)
        record = done.get(step.id)
        if record and record.get("fingerprint") == key and _complete(step.command, str(output)):
            outcomes.append(StepOutcome(step.id, step.command, "skipped", str(output), 0.0, record.get("result", {})))
        else:
            resume = False
            if step.command in MAKES_ARTIFACT:
                partial = artifacts.work_folder(output)
                if output.exists():
                    shutil.rmtree(output)  # made with other options or inputs: stale
                if partial.exists():
                    if step.command == "train" and record and record.get("fingerprint") == key:
                        resume = True  # an interrupted train step continues where it stopped
                    else:
                        shutil.rmtree(partial)
                kwargs["out"] = output
                if step.command == "train":
                    kwargs["resume"] = resume
            kwargs.update(json=True, quiet=quiet, debug=False)
            done[step.id] = {"fingerprint": key, "status": "running"}
            state_path.write_text(json.dumps(state, indent=2))
            started = time.perf_counter()
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                _raw_command(step.command)(**kwargs)
            result = json.loads(buf.getvalue()) if buf.getvalue().strip() else {}
            if step.command not in MAKES_ARTIFACT:
                tmp = output.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(result, indent=2, default=str))
                tmp.replace(output)
            done[step.id] = {"fingerprint": key, "status": "done", "result": _summary(result)}
            state_path.write_text(json.dumps(state, indent=2))
            outcomes.append(StepOutcome(step.id, step.command, "ran", str(output), time.perf_counter() - started,
                                        _summary(result)))
        outputs[step.id] = str(output)
        if step.command in MAKES_ARTIFACT:
            last_artifact = str(output)
    return RunResult(recipe.name, folder, outcomes)


def _summary(doc: dict) -> dict:
    """The few numbers worth keeping in run.json from a step's JSON document."""
    keep = {}
    metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
    for k in ("test_accuracy", "val_accuracy", "train_seconds"):
        if k in metrics:
            keep[k] = metrics[k]
    for k in ("accuracy", "artifact", "ratios"):
        if k in doc:
            keep[k] = doc[k]
    return keep
