"""Typed pipeline configs: dataclasses validated on load, YAML only at the edge.

A pipeline file names its pipeline and gives values for that pipeline's config
dataclass; `--set section.key=value` overrides are parsed as YAML scalars. Every
problem is a `ConfigError` whose one-line message names the key and what was
expected, so the CLI can print it and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the problem."""


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with a default and an allowed numeric range, checked on load."""
    return dataclasses.field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
r"""What a name that becomes a path component may be: run names, model names, aliases.
No '/', no leading '.', so never '..' nor a hidden file; `\Z`, not `$`, which lets a
trailing newline through."""


def named(default: str) -> Any:
    """A dataclass field holding a name that becomes one path component, checked on load."""
    return dataclasses.field(default=default, metadata={"name": True})


@dataclasses.dataclass
class SweepConfig:
    """How `rayline sweep` searches: a Tune search space over dotted config keys."""

    num_samples: int = bounded(8, ge=1)
    """Trials to sample (each grid point counts num_samples times, as in Tune)."""
    seed: int | None = 0
    """Seeds the random search, so a sweep samples the same configurations each time
    (null: a fresh sample each run)."""
    metric: str = ""
    """Result metric the best trial is chosen by; empty means the pipeline's default."""
    mode: Literal["max", "min"] = "max"
    """Whether the metric is maximised or minimised."""
    max_concurrent_trials: int = bounded(0, ge=0)
    """Trials run at once; 0 lets Tune decide from the cluster's resources."""
    search: Literal["random", "optuna"] = "random"
    """`random` samples the space (seeded); `optuna` lets Optuna's TPE sampler propose each
    trial from the results so far (needs `pip install optuna`; no `grid` params)."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """`asha` stops trials early that trail their peers at the same budget."""
    grace_period: int = bounded(1, ge=1)
    """ASHA: the budget every trial gets before it may be stopped (boosting rounds for
    xgboost, reported results otherwise)."""
    reduction_factor: float = bounded(4.0, gt=1.0)
    """ASHA: 1 in reduction_factor trials go on at each rung."""
    max_t: int = bounded(0, ge=0)
    """ASHA: the largest budget; 0 means the pipeline's own (xgboost: the most rounds)."""
    params: dict[str, dict[str, list]] = dataclasses.field(default_factory=dict)
    """Dotted key -> one of {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]},
    {loguniform: [lo, hi]}, {randint: [lo, hi]}."""


SEARCH_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclasses.dataclass
class MLflowConfig:
    """Where the run also goes in MLflow (docs/mlflow.md); empty: nowhere."""

    tracking_uri: str = ""
    """An MLflow tracking URI (sqlite:///runs.db, http://127.0.0.1:5000; a folder only
    with MLFLOW_ALLOW_FILE_STORE=true, MLflow 3's file store being in maintenance): each
    trial becomes an MLflow run of its config, metrics and outcome. Credentials come
    from MLflow's own variables (MLFLOW_TRACKING_TOKEN, ...) in the driver's environment;
    never put them in the URI or a config file."""
    experiment: str = ""
    """The MLflow experiment; empty: the run's name."""
    registry: bool = False
    """Also keep MLflow's Model Registry in step: the registered version, and every alias
    this run moves."""
    timeout_s: float = bounded(10.0, gt=0.0, le=600.0)
    """Each MLflow call's limit (no retries; a server that does not answer is caught up
    with later), and the most the end of a run waits for MLflow."""


@dataclasses.dataclass
class RunConfig:
    """Where a pipeline's run writes and what it is called; each pipeline names its
    default by subclassing with another `name`."""

    name: str = named("run")
    """Experiment name: the Tune run directory and the registered model's name (letters,
    digits, '.', '_' and '-'; it is one folder name)."""
    seed: int = 0
    """Seeds the model's own randomness (initialisation, sampling)."""
    storage_path: str = "./ray_results"
    """Where Tune writes results and TensorBoard event files (path or URI)."""
    store_uri: str = "./artifacts"
    """Model registry the best model is registered in."""
    register: bool = True
    """Register the best trial's model."""
    promote: Literal["none", "always", "gated"] = "none"
    """After registering: leave the alias (`none`), move it to the new version
    (`always`), or move it only if the new version beats the alias's holder on the same
    evaluation by `promote_min_delta` with the interval above 0 (`gated`; the decision
    and its figures go into the model's history)."""
    promote_alias: str = named("production")
    """The alias `promote` moves."""
    promote_min_delta: float = bounded(0.0, ge=0.0)
    """With `promote: gated`: how much better the new version must be."""
    mlflow: MLflowConfig = dataclasses.field(default_factory=MLflowConfig)
    """MLflow tracking and Model Registry (off unless tracking_uri is set)."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["learner.lr=0.001", "env.id=Acrobot-v1"]` -> {"learner.lr": 0.001, ...}."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad override {item!r}: expected KEY=VALUE, e.g. learner.lr=0.001")
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            reason = " ".join(str(exc).split())  # one line, whatever YAML's message spans
            raise ConfigError(
                f"bad override {item!r}: value is not valid YAML ({reason})"
            ) from None
    return overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such pipeline file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of nested `data` with dotted-key overrides set."""
    data = _deep_copy(data)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, validating keys, types and ranges."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}"
        )
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = getattr(cls, "RENAMED", {})
    for old, new in renamed.items():  # a config (or a run resumed) from before a rename
        if old in data:
            if new in data:
                raise ConfigError(f"{prefix}{old}: renamed {prefix}{new}; give only that")
            data = {(new if key == old else key): value for key, value in data.items()}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key (expected one of: {', '.join(sorted(fields))})")
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        values[name] = _check(hints[name], value, key)
        _check_range(fields[name], values[name], key)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able dicts and lists."""
    return dataclasses.asdict(config)


def load(cls: type[T], path: str | Path, overrides: Mapping[str, Any] | None = None) -> T:
    """Load pipeline file `path` into `cls`, after applying dotted overrides."""
    data = apply_overrides(read_yaml(path), overrides or {})
    return from_dict(cls, data)


def _check(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: expected {_describe(hint)}, got {value!r}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, prefix=f"{key}.")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        val_hint = args[1] if args else Any
        return {str(k): _check(val_hint, v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {hint!r}")


def _check_range(field: dataclasses.Field, value: Any, key: str) -> None:
    meta = field.metadata
    if meta.get("name"):
        if not NAME_PATTERN.match(value):
            raise ConfigError(
                f"{key}: expected a name of letters, digits, '.', '_' or '-' that starts "
                f"with a letter or digit (at most 128; it becomes a folder name), got {value!r}"
            )
        return
    if value is None or not meta or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    checks = [
        ("ge", value >= (meta.get("ge") or 0), ">="),
        ("gt", value > (meta.get("gt") or 0), ">"),
        ("le", value <= (meta.get("le") or 0), "<="),
        ("lt", value < (meta.get("lt") or 0), "<"),
    ]
    for name, ok, symbol in checks:
        if meta.get(name) is not None and not ok:
            raise ConfigError(f"{key}: expected a value {symbol} {meta[name]}, got {value!r}")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for field, after in zip(body, body[1:]):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def reference(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, docstring) for every config key of `cls`, nested
    sections flattened, in declaration order: the config reference, from the code."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    for base in cls.__mro__[1:]:  # a subclass that only changes defaults keeps the docs
        if dataclasses.is_dataclass(base):
            docs = {**field_docs(base), **docs}
    rows = []
    instance = cls()
    for field in dataclasses.fields(cls):
        hint, key = hints[field.name], f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hint):
            rows += reference(hint, f"{key}.")
            continue
        default = getattr(instance, field.name)
        rows.append((key, _type_text(hint), default, docs.get(field.name, "")))
    return rows


def _type_text(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_text(a) for a in args)
    if args:
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
