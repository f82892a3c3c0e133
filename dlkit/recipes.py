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
``finetune-epochs``, ``set``). They are checked against the steps' options (``dlkit.steps``, the
table the CLI uses too), so a recipe accepts what the CLI accepts and nothing else; every problem
is reported at once with its line. A step's input is the previous step's artifact unless
``input:`` names an earlier step's id or a path. Steps call the library functions the CLI calls;
their artifacts go under the run folder, and a rerun skips steps whose options and inputs are
unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from dlkit.config import coerce
from dlkit.errors import UsageError
from dlkit.steps import STEPS, StepHooks, StepSpec, option_key

# Options the runner owns: where outputs go, and how they are shown.
RUNNER_OPTIONS = {"out", "json", "quiet", "debug", "resume", "csv", "nproc", "plot"}
TOP_KEYS = {"name", "description", "defaults", "steps"}


class RecipeError(UsageError):
    """A recipe with problems; ``problems`` lists them all as 'line N: ...'."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}: " + "; ".join(problems),
                         hint="fix them and check again with --dry-run")


@dataclass
class Step:
    id: str
    command: str
    options: dict[str, Any]  # as written (defaults and --set applied): shown by --dry-run, fingerprinted
    input: str | None
    line: int
    values: dict[str, Any] = field(default_factory=dict, repr=False)  # options as their types, by parameter


@dataclass
class Recipe:
    path: Path
    name: str
    description: str
    steps: list[Step] = field(default_factory=list)

    def plan(self) -> list[dict]:
        return [{"id": s.id, "command": s.command, "input": s.input, "options": s.options} for s in self.steps]


# ----------------------------------------------------------------------------------------------
# Option values


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """A recipe value as the option's type (``config.coerce`` does the scalars); raises UsageError."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if value not in args:
            raise UsageError(f"{key}={value!r} is not one of {', '.join(args)}")
        return value
    if origin is list:
        if isinstance(value, dict):  # `set: {hidden: 256}` stands for `--set hidden=256`
            value = [f"{k}={v}" for k, v in value.items()]
        return [_coerce(v, args[0], key) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, bool) and tp is not bool:
        raise UsageError(f"{key}={value!r} is not a {tp.__name__}")
    if tp in (str, Path) and isinstance(value, (int, float)):
        value = str(value)  # `input-shape: 784`
    return Path(coerce(value, str, key)) if tp is Path else coerce(value, tp, key)


def _expected(tp: Any) -> str:
    """What a value of this type looks like, for a problem's message."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return "a list of " + _expected(args[0])
    names = {bool: "true or false", int: "an integer", float: "a number"}
    return names.get(tp, "a string")


def _option_types(spec: StepSpec) -> dict[str, tuple[str, Any]]:
    """recipe key -> (parameter name, type) of the options a step takes in a recipe."""
    found = {option_key(name): (name, tp) for name, tp in spec.types().items()
             if option_key(name) not in RUNNER_OPTIONS}
    if spec.input_key:
        found[spec.input_key] = (spec.input_key, list[str] if spec.takes_input == "many" else str)
    return found


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


def text_line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _read_document(path: Path) -> tuple[dict, dict]:
    """The recipe as a mapping, and the line of every key in it."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror}", hint="check the path") from None
    except UnicodeDecodeError as exc:
        line = text_line(path.read_bytes(), exc.start)
        raise RecipeError(str(path), [f"line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x})"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if node is None:
        raise RecipeError(str(path), ["line 1: the recipe is empty"])
    doc, lines = _to_python(node)
    if not isinstance(doc, dict):
        raise RecipeError(str(path), ["line 1: a recipe is a mapping with 'steps' (and optional name, defaults)"])
    return doc, lines


def _check_top_level(path: Path, doc: dict, lines: dict, problems: list[str]) -> dict:
    """Check the keys above the steps; returns the defaults. A recipe without steps stops here."""
    for key in doc:
        if key not in TOP_KEYS:
            problems.append(f"line {lines[key][0]}: unknown key '{key}' (expected {', '.join(sorted(TOP_KEYS))})")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(f"line {lines['defaults'][0]}: 'defaults' must be a mapping of option: value")
        defaults = {}
    if not isinstance(doc.get("steps"), list) or not doc["steps"]:
        problems.append(f"line {lines['steps'][0] if 'steps' in lines else 1}: 'steps' must be a non-empty list")
        raise RecipeError(str(path), problems)
    return defaults


def _parse_step(raw: Any, line: int, sub: Any, problems: list[str]) -> tuple[Step, dict[str, int]] | None:
    """One entry of 'steps' as a Step (its id still the command's name) and its options' lines."""
    if not isinstance(raw, dict):
        problems.append(f"line {line}: a step is a mapping like `train: {{model: cnn}}`")
        return None
    commands = [k for k in raw if k not in ("id", "input")]
    if len(commands) != 1:
        got = ", ".join(map(str, commands)) or "none"
        problems.append(f"line {line}: a step names exactly one command (got {got})")
        return None
    command = commands[0]
    if command not in STEPS:
        problems.append(f"line {sub[command][0]}: unknown command '{command}' (known: {', '.join(STEPS)})")
        return None
    opts = raw[command] if raw[command] is not None else {}
    if not isinstance(opts, dict):
        problems.append(f"line {sub[command][0]}: the options of '{command}' must be a mapping")
        return None
    opt_lines = {str(k).lstrip("-"): v[0] for k, v in (sub[command][1] or {}).items()}
    step = Step(str(raw.get("id", command)), command, dict(opts), raw.get("input"), line)
    return step, opt_lines


def _parse_steps(raw_steps: list, step_lines: list, problems: list[str]) -> list[tuple[Step, dict[str, int]]]:
    """Every well-formed step, with unique ids: a repeated command is named COMMAND-N."""
    parsed = []
    seen_ids: dict[str, int] = {}
    for i, (raw, (line, sub)) in enumerate(zip(raw_steps, step_lines)):
        found = _parse_step(raw, line, sub, problems)
        if found is None:
            continue
        step = found[0]
        if not _plain(step.id):
            problems.append(f"line {sub['id'][0] if 'id' in raw else line}: step id '{step.id}' names a folder in the "
                            "run folder: use letters, digits, '.', '_' and '-' (no separators)")
            continue
        if step.id in seen_ids:
            if "id" in raw:
                problems.append(f"line {sub['id'][0]}: step id '{step.id}' is used twice "
                                f"(first on line {seen_ids[step.id]})")
                continue
            step.id = f"{step.command}-{i + 1}"
        seen_ids[step.id] = line
        parsed.append(found)
    return parsed


def _parse_override(text: str) -> tuple[str, str, Any]:
    import yaml

    key, sep, raw = text.partition("=")
    step, dot, option = key.partition(".")
    if not sep or not dot or not step or not option:
        raise UsageError(f"--set {text!r} is not step.option=value", hint="e.g. --set train.epochs=1")
    return step.strip(), option.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _apply_overrides(steps: list[Step], overrides: list[str], problems: list[str]) -> None:
    by_id = {s.id: s for s in steps}
    for override in overrides:
        step_id, option, value = _parse_override(override)
        if step_id not in by_id:
            problems.append(f"--set {override}: no step '{step_id}' (steps: {', '.join(by_id)})")
            continue
        by_id[step_id].options[option] = value


def _check_options(step: Step, opt_lines: dict[str, int], defaults: dict, problems: list[str]) -> None:
    """Apply the defaults the step takes, then check and convert every option into ``step.values``."""
    spec = STEPS[step.command]
    known = _option_types(spec)
    required = [option_key(n) for n, p in spec.options().items() if p.default is p.empty]
    for key, value in defaults.items():
        if key in known and key not in step.options and key != spec.input_key and key not in required:
            step.options[key] = value
    step.options = {str(k).lstrip("-"): v for k, v in step.options.items()}
    for key, value in step.options.items():
        where = f"line {opt_lines.get(key, step.line)}"
        if key in RUNNER_OPTIONS:
            problems.append(f"{where}: '{key}' is set by `dlkit run` itself; remove it")
        elif key not in known:
            problems.append(f"{where}: '{step.command}' has no option '{key}' (it takes: {', '.join(sorted(known))})")
        else:
            name, tp = known[key]
            try:
                step.values[name] = _coerce(value, tp, key)
            except UsageError:
                problems.append(f"{where}: {step.command} {key}={value!r} should be {_expected(tp)}")
    for key in required:
        if key not in step.options:
            problems.append(f"line {step.line}: '{step.command}' needs '{key}'")


def _check_input(step: Step, earlier: list[Step], problems: list[str]) -> None:
    """A step's input must be an earlier step or a path; a step that takes an artifact must get one."""
    spec = STEPS[step.command]
    if step.input is not None and step.input not in [s.id for s in earlier] and "/" not in str(step.input):
        problems.append(f"line {step.line}: input '{step.input}' is not an earlier step's id "
                        f"(earlier: {', '.join(s.id for s in earlier) or 'none'}) nor a path")
    makers = [s for s in earlier if STEPS[s.command].makes_artifact]
    if spec.takes_input == "one" and spec.input_key not in step.options and step.input is None and not makers:
        problems.append(f"line {step.line}: '{step.command}' needs an artifact, but no earlier step makes one "
                        "(add a train step, or input: PATH)")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe; raises RecipeError listing every problem with its line."""
    path = Path(path)
    doc, lines = _read_document(path)
    problems: list[str] = []
    defaults = _check_top_level(path, doc, lines, problems)
    parsed = _parse_steps(doc["steps"], lines["steps"][1], problems)
    steps = [step for step, _ in parsed]
    _apply_overrides(steps, overrides or [], problems)
    for index, (step, opt_lines) in enumerate(parsed):
        before = len(problems)
        _check_options(step, opt_lines, defaults, problems)
        _check_input(step, steps[:index], problems)
        if len(problems) == before:
            _check_values(step, problems)
    name = str(doc.get("name") or path.stem)
    if not _plain(name):
        where = f"line {lines['name'][0]}" if "name" in doc else "the file name"
        problems.append(f"{where}: recipe name '{name}' names its run folder: use letters, digits, '.', '_' and '-' "
                        "(no separators, not starting with '.')")
    if problems:
        raise RecipeError(str(path), problems)
    return Recipe(path=path, name=name, description=str(doc.get("description") or ""), steps=steps)


PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _plain(name: str) -> bool:
    """A name that stays one folder inside the run folder: no separators, no '..', no leading dot."""
    return PLAIN.fullmatch(name) is not None and len(name) <= 128


def _check_values(step: Step, problems: list[str]) -> None:
    """Build the step's options as the run will and validate them (ranges, names, combinations), so
    that --dry-run accepts exactly what the real run accepts; inputs are not looked at."""
    from dlkit.errors import DlkitError

    spec = STEPS[step.command]
    placeholder = {None: None, "one": "INPUT", "many": ["INPUT"]}[spec.takes_input]
    values = {k: v for k, v in step.values.items() if k != spec.input_key}
    try:
        _, opts = spec.build(step.values.get(spec.input_key, placeholder) or placeholder, **values)
        if hasattr(opts, "validate"):
            opts.validate()
    except DlkitError as exc:
        problems.append(f"line {step.line}: {step.command}: {exc.message}")


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
        return [s.output for s in self.steps if STEPS[s.command].makes_artifact]


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _manifest_digest(path: str) -> str:
    try:
        return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


class _State:
    """run.json: each step's fingerprint, status and summary, rewritten as steps start and finish."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError:
            self.data = {}
        self.steps: dict = self.data.setdefault("steps", {})

    def mark(self, step_id: str, key: str, status: str, result: dict | None = None, error: str | None = None) -> None:
        self.steps[step_id] = {"fingerprint": key, "status": status}
        if result is not None:
            self.steps[step_id]["result"] = result
        if error is not None:
            self.steps[step_id]["error"] = error
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.data, indent=2))
            tmp.replace(self.path)
        except OSError as exc:
            from dlkit.output import os_error

            raise os_error(exc, self.path) from None


def _source(step: Step, earlier: list[Step], outputs: dict[str, str]) -> Any:
    """What the step works on: the input it names, else the latest artifact (all of them for compare)."""
    spec = STEPS[step.command]
    if spec.takes_input is None:
        return None
    named = step.values.get(spec.input_key)
    made = [outputs[s.id] for s in earlier if STEPS[s.command].makes_artifact]
    if spec.takes_input == "many":
        return [outputs.get(n, n) for n in named] if named else made
    if named is not None:
        return named
    if step.input is not None:
        return outputs.get(step.input, step.input)
    return made[-1] if made else None


def _finished(record: dict | None, key: str, spec: StepSpec, output: Path) -> bool:
    """Done before with the same fingerprint, and its output is still whole."""
    from dlkit import artifacts
    from dlkit.errors import DlkitError

    if not record or record.get("fingerprint") != key or record.get("status") != "done":
        return False
    if not spec.makes_artifact:
        return _report_path(output, spec).is_file() and (not spec.writes_folder or output.is_dir())
    try:
        artifacts.read_artifact(output)
    except DlkitError:
        return False
    return True


def _clear_stale(output: Path, record: dict | None, key: str, resumable: bool) -> bool:
    """Remove what an earlier run with other options left; True if an interrupted run can resume."""
    from dlkit import artifacts
    from dlkit.engine.checkpoint import has_checkpoint

    partial = artifacts.work_folder(output)
    for path in (output, partial):
        if path.is_symlink():
            path.unlink()  # never followed: only the link goes
    if output.exists():
        shutil.rmtree(output)  # made with other options or inputs: stale
    if partial.exists():
        if resumable and record and record.get("fingerprint") == key and has_checkpoint(partial):
            return True
        shutil.rmtree(partial)
    return False


def _write_report(output: Path, doc: dict) -> None:
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(output)


def _report_path(output: Path, spec: StepSpec) -> Path:
    """Where a step's JSON report goes: its output itself, or beside the folder it writes."""
    return output.with_name(output.name + ".json") if spec.writes_folder else output


HooksFactory = Callable[[Step], ContextManager[StepHooks]]


def _run_step(step: Step, source: Any, output: Path, key: str, state: _State, hooks: HooksFactory,
              on_result: Callable[[Step, Any], None] | None) -> StepOutcome:
    """Build the step's options, call its library function, keep its report and summary."""
    spec = STEPS[step.command]
    values = {k: v for k, v in step.values.items() if k != spec.input_key}
    if spec.makes_artifact or spec.writes_folder:
        resumable = "resume" in spec.options()  # an interrupted train step continues where it stopped
        resume = _clear_stale(output, state.steps.get(step.id), key, resumable)
        values["out"] = output
        if resumable:
            values["resume"] = resume
    state.mark(step.id, key, "running")
    started = time.perf_counter()
    try:
        source, opts = spec.build(source, **values)
        with hooks(step) as step_hooks:
            result = spec.run(source, opts, step_hooks)
    except BaseException as exc:
        _record_failure(state, step, key, exc)
        raise
    doc = json.loads(json.dumps(result.to_dict(), default=str))
    if not spec.makes_artifact:
        _write_report(_report_path(output, spec), doc)
    if on_result:
        on_result(step, result)
    if spec.check:
        spec.check(result)  # compare's floors: the report is kept, the step stays undone
    state.mark(step.id, key, "done", _summary(doc))
    return StepOutcome(step.id, step.command, "ran", str(output), time.perf_counter() - started, _summary(doc))


def _record_failure(state: _State, step: Step, key: str, exc: BaseException) -> None:
    """run.json says which step failed and why; an interrupted train step says how it goes on."""
    from dlkit.errors import DlkitError, Interrupted

    if isinstance(exc, Interrupted):
        exc.hint = "run the same `dlkit run` again: the step continues from its checkpoint"
    message = exc.message if isinstance(exc, DlkitError) else ("interrupted" if isinstance(exc, KeyboardInterrupt)
                                                              else f"{type(exc).__name__}: {exc}")
    state.mark(step.id, key, "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed",
               error=message)


def _no_hooks(step: Step) -> ContextManager[StepHooks]:
    return contextlib.nullcontext(StepHooks())


def run_recipe(recipe: Recipe, folder: Path, *, on_step: Callable[[int, Step], None] | None = None,
               hooks: HooksFactory = _no_hooks, on_result: Callable[[Step, Any], None] | None = None) -> RunResult:
    """Run every step in order under ``folder``; skip steps already done with the same inputs.

    ``on_step(index, step)`` is called as a step starts, ``hooks(step)`` opens what watches it
    (progress bars), and ``on_result(step, result)`` gets the result of every step that ran."""
    from dlkit import output as out_folder

    with out_folder.Destination(folder):  # one `dlkit run` at a time per run folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise out_folder.os_error(exc, folder) from None
        return _run_steps(recipe, folder, on_step, hooks, on_result)


def _run_steps(recipe: Recipe, folder: Path, on_step, hooks, on_result) -> RunResult:
    state = _State(folder / STATE_FILE)
    outputs: dict[str, str] = {}
    outcomes = []
    for index, step in enumerate(recipe.steps):
        spec = STEPS[step.command]
        source = _source(step, recipe.steps[:index], outputs)
        sources = source if isinstance(source, list) else [source] if source is not None else []
        output = folder / (step.id if spec.makes_artifact or spec.writes_folder else f"{step.id}.json")
        key = fingerprint(step.command, step.options, [_manifest_digest(p) for p in sources])
        if on_step:
            on_step(index, step)
        record = state.steps.get(step.id)
        if _finished(record, key, spec, output):
            outcomes.append(StepOutcome(step.id, step.command, "skipped", str(output), 0.0, record.get("result", {})))
        else:
            outcomes.append(_run_step(step, source, output, key, state, hooks, on_result))
        outputs[step.id] = str(output)
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
