"""Run configs: a TOML (or JSON) file plus flag overrides, checked and completed with defaults.

``resolve_config(raw)`` returns the *resolved* config: every section and key present, defaults
filled in (including every constructor argument of the chosen method), method names in their
canonical spelling. That dict is what a store records and what ``replay`` rebuilds from.
Every problem raises :class:`~influencekit.errors.ConfigError` naming the key, the bad value and
what is allowed. The schema is :data:`SCHEMA`; ``docs/cli.md`` prints it as a table.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

REQUIRED = object()
CURVATURE_KINDS = ("hessian", "ggn", "fisher", "empirical_fisher")
DTYPES = ("", "float32", "float64")
SELECTIONS = ("all", "misclassified", "correct")
TASKS = ("classification", "regression")
RETRAINERS = ("lbfgs", "sgd")
TRUST_ASSUMPTIONS = ("convexity", "numeric stability", "training trajectory",
                     "parameter divergence", "first-order expansion")


@dataclass(frozen=True)
class Key:
    """One config key: accepted type, default (``REQUIRED`` when none), help, choices."""

    type: type | tuple
    default: Any
    help: str
    choices: tuple | None = None
    item: type | tuple | None = None  # element type of a list

    def allowed(self) -> str:
        if self.choices is not None:
            return ", ".join(repr(c) for c in self.choices)
        name = _type_name(self.type)
        if self.item is not None:
            name += " of " + {str: "strings", int: "integers", float: "numbers"}.get(
                self.item, _type_name(self.item))
        return f"{name} ({self.help})"


IMPORT_HELP = "an import path 'package.module:function'"

SCHEMA: dict[str, Any] = {
    "store": Key(str, "", "folder of the run store; the --store flag overrides it"),
    "model": {
        "factory": Key(str, REQUIRED, IMPORT_HELP + " returning the trained nn.Module; it is "
                       "given the training data as train= when it has that parameter"),
        "args": Key(dict, {}, "keyword arguments of the model factory"),
    },
    "data": {
        "factory": Key(str, REQUIRED, IMPORT_HELP + " returning RunData(train=..., query=...) "
                       "or a (train, query) pair"),
        "args": Key(dict, {}, "keyword arguments of the data factory"),
        "select": Key(str, "all", "which queries to keep", SELECTIONS),
        "max_queries": Key(int, 0, "keep at most this many queries; 0 keeps all"),
    },
    "task": {
        "name": Key(str, "classification", "'classification', 'regression' or an import path "
                    "'package.module:Class' of a Task; the other keys of [task] are its "
                    "constructor arguments"),
    },
    "target": {
        "params": Key(list, [], "parameter names to take influence over; [] = all trainable",
                      item=str),
        "modules": Key(list, [], "module names whose parameters are taken; [] = all", item=str),
        "l2_strength": Key(float, 0.0, "strength of the L2 regulariser "
                           "R = (l2_strength/2)‖θ‖² of the training "
                  "objective (must match how the model was trained)"),
    },
    "curvature": {"kind": Key(str, "ggn", "curvature of the mean training loss",
                              CURVATURE_KINDS)},
    "method": {
        "name": Key(str, REQUIRED, "an inverse (Exact, CG, LiSSA, Arnoldi, KFAC, EKFAC, "
                    "Diagonal, Identity, block_diagonal) or a scorer (TracIn, TRAK); the other "
                    "keys of [method] are its constructor arguments"),
    },
    "runtime": {
        "device": Key(str, "cpu", "torch device"),
        "dtype": Key(str, "", "dtype of gradients; '' keeps the parameters' dtype", DTYPES),
        "batch_size": Key(int, 256, "examples per batch"),
    },
    "score": {
        "top_k": Key(int, 0, "store only the k most helpful and harmful per query; 0 stores "
                     "the full [n_query, n_train] matrix"),
        "keep": Key(int, 20, "with top_k = 0: how many top examples per query are also "
                    "listed for the report"),
        "bins": Key(int, 40, "bins of each query's score histogram"),
        "self_influence": Key(bool, False, "also store the self-influence [n_train]"),
    },
    "eval": {
        "queries": Key(int, 0, "how many queries the ground truth is computed for; 0 = all"),
        "loo": Key(int, 0, "leave-one-out re-optimisation of this many training examples "
                   "(largest absolute scores)"),
        "loo_warm_start": Key(bool, True, "start leave-one-out from the trained parameters"),
        "lds_subsets": Key(int, 0, "retrain on this many random subsets for the LDS; 0 skips"),
        "lds_alpha": Key(float, 0.5, "fraction of the training data in each LDS subset"),
        "removal": Key(list, [], "removal curve: numbers k of top examples removed", item=int),
        "removal_queries": Key(int, 1, "queries that get a removal curve"),
        "retrainer": Key(str, "lbfgs", "how LDS and removal retrain", RETRAINERS),
        "retrainer_args": Key(dict, {}, "keyword arguments of LBFGSRetrainer / SGDRetrainer"),
        "response_curve": Key(bool, False, "re-optimise with the first query's most helpful "
                              "example reweighted by 1 + ε, beside the first-order tangent"),
        "epsilons": Key(list, [-1.0, -0.5, 0.5, 1.0], "weights 1 + ε of the response curve",
                        item=float),
        "trust": Key(bool, False, "run ik.diagnostics.check and store the TrustReport"),
        "trust_include": Key(list, list(TRUST_ASSUMPTIONS), "assumptions checked",
                             item=str),
        "seed": Key(int, 0, "seed of subset sampling and retraining"),
    },
    "report": {
        "title": Key(str, "", "title of the HTML report"),
        "notes": Key(str, "", "a paragraph shown under the title"),
        "top": Key(int, 5, "helpful and harmful examples shown per query"),
        "max_queries": Key(int, 50, "queries shown with their examples (the index lists all)"),
    },
}

OPEN_SECTIONS = ("task", "method")  # extra keys are constructor arguments


# -- reading and overriding ------------------------------------------------------------------
def load_config(path: str | Path) -> dict:
    """Read a ``.toml`` or ``.json`` config; a shipped example name (``digits``) also works.

    A run store's ``config.json`` (a store folder, or that file) is read through
    :class:`~influencekit.report.RunStore`, which verifies its checksum."""
    path = find_config(path)
    if path.suffix == ".json" and _in_run_store(path):
        from ..report.store import RunStore

        return RunStore(path.parent).config()
    try:
        text = path.read_text()
        if path.suffix == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, "a valid TOML or JSON file",
                          problem=f"cannot be parsed ({exc})") from exc


def shipped_configs() -> dict[str, Path]:
    """The example configs shipped inside the package, by name."""
    folder = Path(__file__).resolve().parent.parent / "examples" / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def _in_run_store(path: Path) -> bool:
    """Whether ``path`` is the ``config.json`` a run store wrote (it carries a checksum, or
    sits beside the store's other files)."""
    from ..report.store import CONFIG, PARTITIONS, RUN, TENSOR_PARTS

    if path.name != CONFIG:
        return False
    if any((path.parent / name).exists() for name in (RUN, PARTITIONS, *TENSOR_PARTS)):
        return True
    try:
        return '"checksum"' in path.read_text(errors="replace")
    except OSError:
        return False


def find_config(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if candidate.is_dir() and (candidate / "config.json").is_file():
        return candidate / "config.json"  # a store folder
    shipped = shipped_configs()
    if str(path) in shipped:
        return shipped[str(path)]
    raise ConfigError("config", str(path), f"a TOML/JSON file, a store folder or a shipped "
                      f"example ({', '.join(shipped)})", problem="does not exist")


def parse_override(text: str) -> tuple[str, Any]:
    """``"method.damping=1e-2"`` -> ``("method.damping", 0.01)`` (values read as TOML; a value
    that is not valid TOML is taken as a string)."""
    if "=" not in text:
        raise ConfigError("--set", text, "KEY=VALUE, e.g. method.damping=1e-2",
                          problem="has no '='")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(config: dict, overrides: list[tuple[str, Any]]) -> dict:
    """A copy of ``config`` with each dotted key set to its value."""
    out = copy.deepcopy(config)
    for key, value in overrides:
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, value, f"'{part}' is not a table, so it has no keys",
                                  problem="cannot be set")
        node[parts[-1]] = value
    return out


# -- checking and completing ------------------------------------------------------------------
def resolve_config(raw: dict) -> dict:
    """Check ``raw`` against :data:`SCHEMA` and return it complete with defaults."""
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", raw, "a table of sections", problem="is not a table")
    unknown = set(raw) - set(SCHEMA)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(key, raw[key], "sections " + ", ".join(SCHEMA),
                          problem="is not a known key")
    out: dict[str, Any] = {}
    for name, spec in SCHEMA.items():
        if isinstance(spec, Key):
            out[name] = _checked(name, raw.get(name, spec.default), spec)
            continue
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(name, section, "a table [" + name + "]", problem="is not a table")
        out[name] = _resolve_section(name, section, spec)
    out["task"] = _resolve_task(out["task"], raw.get("task", {}))
    out["method"] = resolve_method(raw.get("method", {}), "method")
    _check_retrainer(out["eval"])
    bad = [a for a in out["eval"]["trust_include"] if a not in TRUST_ASSUMPTIONS]
    if bad:
        raise ConfigError("eval.trust_include", bad[0], ", ".join(map(repr, TRUST_ASSUMPTIONS)))
    return out


def _resolve_section(name: str, section: dict, spec: dict) -> dict:
    if name not in OPEN_SECTIONS:
        unknown = set(section) - set(spec)
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"{name}.{key}", section[key], "keys " + ", ".join(spec),
                              problem="is not a known key")
    out = {}
    for key, rule in spec.items():
        dotted = f"{name}.{key}"
        if key not in section:
            if rule.default is REQUIRED:
                raise ConfigError(dotted, None, rule.allowed(), problem="is missing")
            out[key] = copy.deepcopy(rule.default)
        else:
            out[key] = _checked(dotted, section[key], rule)
    return out


def _checked(key: str, value, rule: Key):
    if not _is_instance(value, rule.type):
        raise ConfigError(key, value, rule.allowed(),
                          problem=f"has the wrong type ({type(value).__name__})")
    if rule.choices is not None and value not in rule.choices:
        raise ConfigError(key, value, rule.allowed())
    if rule.item is not None:
        for item in value:
            if not _is_instance(item, rule.item):
                raise ConfigError(key, value, rule.allowed(),
                                  problem=f"holds {item!r} of the wrong type")
    if rule.type is float:
        return float(value)
    if rule.type is str and rule.help.startswith(IMPORT_HELP) and value:
        check_import_path(key, value)
    return copy.deepcopy(value)


def _is_instance(value, types_) -> bool:
    types_ = types_ if isinstance(types_, tuple) else (types_,)
    if isinstance(value, bool):
        return bool in types_
    if float in types_ and isinstance(value, int):
        return True
    return isinstance(value, types_)


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false",
            list: "a list", dict: "a table", type(None): "nothing"}.get(t, t.__name__)


# -- task ---------------------------------------------------------------------------------------
def task_class(name: str, key: str = "task.name"):
    """The Task class named in a config (built-in name or import path)."""
    from ..task import ClassificationTask, RegressionTask, Task

    builtin = {"classification": ClassificationTask, "regression": RegressionTask}
    if name in builtin:
        return builtin[name]
    if ":" not in name:
        raise ConfigError(key, name, ", ".join(map(repr, TASKS)) + " or 'package.module:Class'")
    cls = import_object(key, name)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(key, name, "a subclass of influencekit.Task",
                          problem="does not name a Task class")
    return cls


def _resolve_task(section: dict, raw: dict) -> dict:
    cls = task_class(section["name"])
    args = {k: v for k, v in raw.items() if k != "name"}
    return {"name": section["name"], **_constructor_args("task", cls, args)}


# -- methods ------------------------------------------------------------------------------------
def method_classes() -> dict[str, type]:
    """Every method a config may name: the inverses and the two scorers."""
    from ..inverse import REGISTRY
    from ..scoring import TRAK, TracIn

    public = {n: c for n, c in REGISTRY.items() if not n.startswith("_")}
    public["block_diagonal"] = public.pop("BlockDiagonal")
    public.update({"TracIn": TracIn, "TRAK": TRAK})
    first = [n for n in METHOD_ORDER if n in public]
    return {n: public[n] for n in first + sorted(set(public) - set(first))}


METHOD_ORDER = ("Exact", "CG", "LiSSA", "Arnoldi", "KFAC", "EKFAC", "Diagonal", "Identity",
                "block_diagonal", "TracIn", "TRAK")


SCORER_SETTINGS = {
    "TracIn": {
        "checkpoints": Key(str, "", IMPORT_HELP + " (model, train) -> list of flat parameter "
                           "vectors; '' uses the trained parameters only"),
        "learning_rates": Key((float, list), 1.0, "one learning rate, or one per checkpoint"),
    },
    "TRAK": {
        "damping": Key(float, 0.0, "λ added to the mean kernel"),
        "output": Key(str, "margin", "model output function", ("margin", "loss")),
        "projection_dim": Key(int, 0, "dimension of the random projection; 0 = none"),
        "projection_kind": Key(str, "gaussian", "random projection kind",
                               ("gaussian", "rademacher")),
        "seed": Key(int, 0, "seed of the projection"),
    },
}


def canonical_method(name, key: str = "method.name") -> str:
    classes = method_classes()
    if isinstance(name, str):
        folded = {n.lower(): n for n in classes}
        if name.lower() in folded:
            return folded[name.lower()]
    raise ConfigError(key, name, ", ".join(classes), problem="is not a known method")


def resolve_method(section: dict, key: str) -> dict:
    """Check a method table (``name`` + constructor arguments) and fill in its defaults."""
    if not isinstance(section, dict):
        raise ConfigError(key, section, "a table with a 'name' key", problem="is not a table")
    if "name" not in section:
        raise ConfigError(f"{key}.name", None, SCHEMA["method"]["name"].allowed(),
                          problem="is missing")
    name = canonical_method(section["name"], f"{key}.name")
    args = {k: v for k, v in section.items() if k != "name"}
    if name in SCORER_SETTINGS:
        return {"name": name, **_resolve_section(key, args, SCORER_SETTINGS[name])}
    if name == "block_diagonal":
        return {"name": name, **_resolve_block(args, key)}
    return {"name": name, **_constructor_args(key, method_classes()[name], args)}


def _resolve_block(args: dict, key: str) -> dict:
    unknown = set(args) - {"groups", "default"}
    if unknown:
        bad = sorted(unknown)[0]
        raise ConfigError(f"{key}.{bad}", args[bad], "keys groups, default",
                          problem="is not a known key")
    groups = args.get("groups", {})
    if not isinstance(groups, dict):
        raise ConfigError(f"{key}.groups", groups, "a table {module prefix = {name = ...}}",
                          problem="is not a table")
    default = args.get("default")
    return {"groups": {spec: resolve_method(m, f"{key}.groups.{spec}")
                       for spec, m in groups.items()},
            "default": None if default is None else resolve_method(default, f"{key}.default")}


def _constructor_args(key: str, cls, args: dict) -> dict:
    """Check ``args`` against ``cls.__init__`` (names and annotated types); add defaults."""
    signature = inspect.signature(cls.__init__)
    params = {n: p for n, p in signature.parameters.items()
              if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: skip type checks
        hints = {}
    unknown = set(args) - set(params)
    if unknown:
        bad = sorted(unknown)[0]
        raise ConfigError(f"{key}.{bad}", args[bad],
                          f"arguments of {cls.__name__}: " + ", ".join(params),
                          problem="is not a known key")
    out = {}
    for name, param in params.items():
        dotted = f"{key}.{name}"
        if name in args:
            value = args[name]
            hint = hints.get(name)
            if hint is not None and not _matches_hint(value, hint):
                raise ConfigError(dotted, value, _hint_name(hint),
                                  problem=f"has the wrong type ({type(value).__name__})")
            out[name] = float(value) if hint is float and isinstance(value, int) else value
        elif param.default is inspect.Parameter.empty:
            raise ConfigError(dotted, None, f"a value for {cls.__name__}({name}=...)",
                              problem="is missing")
        elif _jsonable(param.default):
            out[name] = copy.deepcopy(param.default)
        # a default a config cannot spell (a dtype, a callable) is left to the constructor
    return out


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _matches_hint(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches_hint(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        inner = typing.get_args(hint)
        return isinstance(value, list) and (
            not inner or all(_matches_hint(v, inner[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if hint in (float, int, str, bool):
        return _is_instance(value, hint)
    return True  # a type a config cannot spell (callables, tensors): let the method check it


def _hint_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(h) for h in typing.get_args(hint))
    if origin in (list, tuple):
        inner = typing.get_args(hint)
        return "a list" + (f" of {_hint_name(inner[0])}" if inner else "")
    if hint is type(None):
        return "nothing (leave the key out)"
    return _type_name(hint) if isinstance(hint, type) else str(hint)


def _check_retrainer(section: dict) -> None:
    from ..response import LBFGSRetrainer, SGDRetrainer

    cls = LBFGSRetrainer if section["retrainer"] == "lbfgs" else SGDRetrainer
    args = dict(section["retrainer_args"])
    args.pop("dtype", None)
    _constructor_args("eval.retrainer_args", cls, args)


# -- import paths -------------------------------------------------------------------------------
def check_import_path(key: str, path: str) -> None:
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(key, path, "an import path 'package.module:function', e.g. "
                          "'influencekit.examples.digits:model'",
                          problem="is not an import path")


def import_object(key: str, path: str):
    """The object at ``package.module:name``; ConfigError naming what failed."""
    check_import_path(key, path)
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(key, path, "an importable module (installed, or on PYTHONPATH)",
                          problem=f"cannot be imported ({exc})") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n, v in vars(module).items() if not n.startswith("_")
                     and callable(v) and getattr(v, "__module__", None) == module_name]
            raise ConfigError(key, path, f"a function or class defined in {module_name}: "
                              + ", ".join(sorted(names)[:20]),
                              problem=f"names no attribute '{attr}' of {module_name}")
        obj = getattr(obj, part)
    return obj


def fit_part(config: dict) -> dict:
    """The part of a resolved config that determines the fitted inverse."""
    keys = ("model", "data", "task", "target", "curvature", "method")
    part = {k: config[k] for k in keys}
    part["runtime"] = {"dtype": config["runtime"]["dtype"]}
    return part
