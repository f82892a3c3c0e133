"""The user's own module, ``path/to/file.py:Name``, loaded as ``python file.py`` would import it,
minus the script part (``profile`` and ``compare`` take it; see ``dlkit.profiling.target``):

* the file's folder is first on ``sys.path`` while it loads (and while ``Name`` builds the model),
  so ``from model import GPT`` finds the sibling ``model.py``; the sibling modules are dropped from
  ``sys.modules`` afterwards, so a second file with its own ``model.py`` gets its own;
* ``Name`` is a class or a factory function (an ``nn.Module`` instance works too); ``--set key=value``
  passes keyword arguments, each converted to the type its parameter is annotated with (else its
  default's type; unannotated: a bool, int, float or string, whichever reads);
* anything the code prints, while loading and in every forward pass, goes to stderr, so stdout
  keeps its one path or JSON document: the model's ``forward`` is replaced on the instance by a
  wrapper (bound with ``types.MethodType``, so a deep copy rebinds it; the state dict is unchanged);
* an error raised in the user's code becomes one line naming the file and line where it was raised
  (the deepest frame inside the file's folder) and what to do; the original exception is chained,
  so ``--debug`` shows its traceback.

Loading a user's module runs its code: that is what the user asks for by naming it. Artifacts never
hold code, so a module is profiled or compared, never trained into an artifact (``train`` refuses it).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlkit.errors import DlkitError, IncompatibleError, NotFoundError, UsageError


@dataclass
class UserObject:
    """What ``file.py:Name`` names, and where it came from (for error messages)."""

    obj: Any  # a class, a factory function, or an nn.Module instance
    file: str  # as the user spelled it
    name: str
    folder: Path  # the file's folder (resolved): frames there are the user's


def _shown(path: str | os.PathLike) -> str:
    """A path as short as it reads unambiguously: relative to the working folder when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _user_frame(exc: BaseException, folder: Path) -> str | None:
    """'model.py line 12 (in forward)' for the deepest frame of ``exc`` inside ``folder``, if any."""
    where = None
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{_shown(exc.filename)} line {exc.lineno}"
    for frame in traceback.extract_tb(exc.__traceback__):
        try:
            inside = Path(frame.filename).resolve().is_relative_to(folder)
        except (OSError, ValueError):
            inside = False
        if inside:
            where = f"{_shown(frame.filename)} line {frame.lineno} (in {frame.name})"
    return where


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_sibling(name: str, module: types.ModuleType, folder: Path) -> bool:
    """Whether ``module`` was imported from ``folder`` as a sibling: ``folder/top.py`` or the package
    ``folder/top/``, ``top`` being its name's first part (not a package installed under the folder,
    such as a virtual environment's)."""
    top = name.partition(".")[0]
    paths = [getattr(module, "__file__", None), *list(getattr(module, "__path__", None) or [])]
    for p in paths:
        if not p:
            continue
        try:
            path = Path(p).resolve()
        except (OSError, ValueError):
            continue
        if path == folder / f"{top}.py" or path.is_relative_to(folder / top):
            return True
    return False


@contextlib.contextmanager
def _importable(folder: Path):
    """``folder`` first on ``sys.path`` (as ``python file.py`` puts it). Sibling modules imported
    from it are dropped from ``sys.modules`` afterwards, so a later file's ``model.py`` is its own;
    names imported before (dlkit itself, torch) are never touched."""
    entry = str(folder)
    before = set(sys.modules)
    tops = {n.partition(".")[0] for n in before}
    sys.path.insert(0, entry)
    importlib.invalidate_caches()  # siblings written a moment ago must be seen
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
        for name in set(sys.modules) - before:
            module = sys.modules.get(name)
            if (module is not None and name.partition(".")[0] not in tops and not name.startswith("dlkit_user_")
                    and _is_sibling(name, module, folder)):
                del sys.modules[name]


def load_user_object(ref: str) -> UserObject:
    """``path/to/file.py:Name`` -> the class, factory function or module instance called ``Name``,
    loaded with the file's folder importable and its prints sent to stderr; one clear error per way
    it can fail (the original exception chained, for ``--debug``)."""
    file, _, name = ref.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise NotFoundError(f"no module file {file}", hint="give path/to/file.py:Name")
    folder = path.resolve().parent
    mod_name = f"dlkit_user_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        with _importable(folder), contextlib.redirect_stdout(sys.stderr):  # its prints stay off stdout
            module_spec.loader.exec_module(module)
    except SystemExit as exc:
        sys.modules.pop(mod_name, None)
        raise UsageError(f"cannot load {file}: it calls sys.exit({exc.code!r}) when imported"
                         + (f" ({_user_frame(exc, folder)})" if _user_frame(exc, folder) else ""),
                         hint="put the script part under `if __name__ == \"__main__\":`") from exc
    except Exception as exc:  # the user's code: any error is theirs to see, in one line
        sys.modules.pop(mod_name, None)
        where = _user_frame(exc, folder)
        raise UsageError(f"cannot load {file}: {_first_line(exc)}" + (f" at {where}" if where else ""),
                         hint=f"fix the file so that `python {file}` imports (its folder is on the import "
                              "path); --debug shows the traceback") from exc
    obj = getattr(module, name, None)
    if obj is None:
        names = [n for n, v in vars(module).items()
                 if (isinstance(v, type) and issubclass(v, nn.Module) or inspect.isfunction(v))
                 and getattr(v, "__module__", None) == mod_name]
        raise NotFoundError(f"{file} has no class {name} (nor a factory function of that name)",
                            hint="classes and functions defined there: " + (", ".join(names) or "none"))
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise UsageError(f"{name} in {file} is not a torch.nn.Module (it is a plain class)",
                         hint="point at a class that subclasses torch.nn.Module, or a function returning one")
    if not (isinstance(obj, (type, nn.Module)) or callable(obj)):
        raise UsageError(f"{name} in {file} is not a torch.nn.Module (it is a {type(obj).__name__})",
                         hint="point at an nn.Module class, or a function that returns one")
    return UserObject(obj, file, name, folder)


def load_module_class(ref: str) -> Any:
    """``path/to/file.py:Name`` -> the class or factory function (see ``load_user_object``)."""
    return load_user_object(ref).obj


def _defined_at(fn: Any) -> str:
    """' (file.py line N)' where ``fn`` (a function or a class's __init__) is defined, or ''."""
    try:
        return f" ({_shown(inspect.getsourcefile(fn))} line {inspect.getsourcelines(fn)[1]})"
    except (OSError, TypeError):
        return ""


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str}


def _guess(text: str) -> Any:
    """An unannotated argument: a bool, int, float or None if it reads as one, else the string."""
    from dlkit.config import coerce

    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for tp in (int, float):
        with contextlib.suppress(UsageError):
            return coerce(text, tp, "")
    return text


def _param_type(p: inspect.Parameter, hints: dict) -> Any:
    """The type a --set value of parameter ``p`` converts to (None: guess)."""
    tp = hints.get(p.name, p.annotation)
    if isinstance(tp, str):  # an annotation get_type_hints could not resolve
        tp = _SIMPLE.get(tp.strip())
    if tp is inspect.Parameter.empty or tp is Any:
        tp = None
    if tp is None and p.default is not inspect.Parameter.empty and p.default is not None:
        d = p.default
        if isinstance(d, tuple) and d and len({type(v) for v in d}) == 1 and type(d[0]) in _SIMPLE.values():
            tp = tuple[type(d[0]), ...]
        elif type(d) in _SIMPLE.values():
            tp = type(d)
    return tp


def _convert(text: str, tp: Any, key: str) -> Any:
    from dlkit.config import coerce

    if tp is None:
        return _guess(text)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        for a in args:
            if str(a) == text or (isinstance(a, bool) and text.lower() == str(a).lower()):
                return a
        raise UsageError(f"{key}={text!r} is not one of {', '.join(map(str, args))}")
    if origin is list:
        return list(coerce(text, tuple[args[0] if args else str, ...], key))
    return coerce(text, tp, key)


def constructor_kwargs(obj: Any, overrides: dict[str, str], label: str) -> dict[str, Any]:
    """``--set`` values typed from ``obj``'s signature (a class's ``__init__`` or a function); every
    parameter without a default must be given. ``label`` names the object in messages."""
    fn = obj.__init__ if isinstance(obj, type) else obj
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return dict(overrides)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # names only importable under TYPE_CHECKING, say: fall back to the raw annotations
        hints = {}
    params = sig.parameters
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    at = _defined_at(fn)
    out: dict[str, Any] = {}
    for key, text in overrides.items():
        if key in named:
            try:
                out[key] = _convert(text, _param_type(named[key], hints), f"--set {key}")
            except UsageError as exc:
                if "cannot be set from the shell" not in exc.message:
                    raise UsageError(exc.message, hint=f"{label} takes {key}: {_type_name(named[key], hints)}"
                                                       f"{at}") from None
                raise UsageError(f"--set {key}: {label} takes a {_type_name(named[key], hints)}, which "
                                 f"cannot be given from the shell{at}",
                                 hint="write a factory function in the file that builds it and point at "
                                      "that") from None
        elif takes_any:
            out[key] = _guess(text)
        else:
            raise UsageError(f"{label} takes no argument '{key}'{at}",
                             hint="its arguments: " + (", ".join(named) or "none"))
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty and n not in out]
    if missing:
        raise UsageError(f"{label} needs argument{'s' if len(missing) > 1 else ''} {', '.join(missing)}{at}",
                         hint=f"give {' '.join(f'--set {m}=VALUE' for m in missing)}, or point at a factory "
                              "function that builds the model without arguments")
    return out


def _type_name(p: inspect.Parameter, hints: dict) -> str:
    tp = _param_type(p, hints)
    if tp is None:
        return "any value"
    return str(tp).replace("typing.", "") if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))


def _guard(model: nn.Module, user: UserObject, label: str) -> nn.Module:
    """Replace ``model.forward`` on the instance (the state dict is unchanged) by one that sends
    the user's prints to stderr and turns an exception into one line naming where it was raised."""
    bound = model.forward
    func = getattr(bound, "__func__", None)
    if func is None or getattr(bound, "__self__", None) is not model:
        return model  # a forward set on the instance by the user's code: left as it is

    def forward(self, *args, **kwargs):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return func(self, *args, **kwargs)
        except DlkitError:
            raise
        except (Exception, SystemExit) as exc:
            raise _forward_error(exc, args, user, label) from exc

    model.forward = types.MethodType(forward, model)  # bound to the instance: deepcopy rebinds it
    return model


def _describe_input(args: tuple) -> str:
    t = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if t is None:
        return "its input"
    return "input " + "x".join(map(str, t.shape)) + f" ({str(t.dtype).replace('torch.', '')})"


def _forward_error(exc: BaseException, args: tuple, user: UserObject, label: str) -> DlkitError:
    first = _first_line(exc)
    where = _user_frame(exc, user.folder)
    at = f" at {where}" if where else ""
    inp = _describe_input(args)
    low = first.lower()
    floats = inp.endswith("(float32)")
    if floats and ("indices" in low or "long, int" in low or "embedding" in low):
        return IncompatibleError(f"{inp} does not fit {label}: it takes token ids ({first}){at}",
                                 hint="add --input-dtype long (ids below --vocab-size, default: the size of its "
                                      "first nn.Embedding)")
    if isinstance(exc, IndexError) or "index out of range" in low:
        return IncompatibleError(f"{inp} does not fit {label}: {first}{at}",
                                 hint="token ids must be below the embedding size: give --vocab-size, or "
                                      "--input-dtype float for a float input; --debug shows the traceback")
    if any(w in low for w in ("shape", "size", "mat1", "dimension", "expected", "channels", "length", "dtype",
                              "scalar type")):
        return IncompatibleError(f"{inp} does not fit {label}: {first}{at}",
                                 hint="give the input the model takes: --input-shape (batch first), "
                                      "--input-dtype long for token ids; --debug shows the traceback")
    return IncompatibleError(f"{label} failed on {inp}: {first}{at}",
                             hint="fix the code there, or give the input it takes (--input-shape, "
                                  "--input-dtype); --debug shows the traceback")


def build_user_model(ref: str, overrides: dict[str, str] | None = None) -> tuple[nn.Module, UserObject]:
    """The model ``file.py:Name`` builds (with ``--set`` keyword arguments), its forward guarded."""
    user = load_user_object(ref)
    label = f"{Path(user.file).name}:{user.name}"
    obj = user.obj
    if isinstance(obj, nn.Module):
        if overrides:
            raise UsageError(f"{label} is a model already built, which takes no --set",
                             hint="point at its class or at a factory function")
        model = obj
    else:
        kwargs = constructor_kwargs(obj, dict(overrides or {}), f"{label}()")
        torch.manual_seed(0)
        try:
            with _importable(user.folder), contextlib.redirect_stdout(sys.stderr):
                model = obj(**kwargs)
        except DlkitError:
            raise
        except (Exception, SystemExit) as exc:
            where = _user_frame(exc, user.folder)
            raise UsageError(f"{label}() failed: {_first_line(exc)}" + (f" at {where}" if where else ""),
                             hint="fix the constructor there, or pass its arguments with --set key=value; "
                                  "--debug shows the traceback") from exc
        if not isinstance(model, nn.Module):
            raise UsageError(f"{label}() returned a {type(model).__name__}, not a torch.nn.Module"
                             f"{_defined_at(obj)}", hint="point at a class or function that returns the model")
    return _guard(model, user, label), user


def first_embedding(model: nn.Module) -> nn.Embedding | None:
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
