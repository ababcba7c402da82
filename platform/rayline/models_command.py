"""`rayline models`: list, show, promote (plain or gated), compare and history of the
models in a registry."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from rayline.config import ConfigError
from rayline.store import DEFAULT_STORE_URI, ModelRegistry, RegistryError

BROKEN_MODELS = 3
"""`rayline models list --strict` when a version or alias cannot be read."""
GATE_REFUSED = 3
"""`models promote --gate`: the candidate did not beat the alias's holder."""


def add_parser(commands, parser_class) -> None:
    """`rayline models list / show / promote`."""
    models = commands.add_parser("models", help="list, show and promote registered models")
    models.add_argument(
        "--store",
        default=os.environ.get("RAYLINE_STORE", DEFAULT_STORE_URI),
        help="model store URI (default: $RAYLINE_STORE or ./artifacts)",
    )
    verbs = models.add_subparsers(dest="verb", required=True, parser_class=parser_class)
    listing = verbs.add_parser("list", help="every model version, or one model's")
    listing.add_argument("name", nargs="?", help="only this model")
    listing.add_argument(
        "--strict",
        action="store_true",
        help=f"exit {BROKEN_MODELS} when a version cannot be read (default: list it as broken)",
    )
    show = verbs.add_parser("show", help="one version's metadata as JSON")
    show.add_argument("name")
    show.add_argument(
        "ref", nargs="?", default="latest", help="version number or alias (default latest)"
    )
    promote = verbs.add_parser("promote", help="point an alias (default production) at a version")
    promote.add_argument("name")
    promote.add_argument("ref", help="version number or alias to promote")
    promote.add_argument("--alias", default="production")
    promote.add_argument(
        "--gate",
        action="store_true",
        help="move the alias only if this version beats the alias's holder on the same "
        f"evaluation (by --min-delta, interval above 0); else exit {GATE_REFUSED}",
    )
    promote.add_argument("--min-delta", type=float, default=0.0, help="with --gate (default 0)")
    promote.add_argument(
        "--episodes", type=int, default=50, help="samples of the comparison (default 50)"
    )
    promote.add_argument(
        "--mlflow",
        metavar="URI",
        default=None,
        help="also move the alias in this MLflow Model Registry (docs/mlflow.md)",
    )
    sync = verbs.add_parser(
        "sync",
        help="bring an MLflow Model Registry in step with this store: versions, aliases, "
        "refused promotions (idempotent)",
    )
    sync.add_argument("name", nargs="?", help="only this model (default: every model)")
    sync.add_argument(
        "--mlflow",
        metavar="URI",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="the MLflow tracking URI (default: $MLFLOW_TRACKING_URI)",
    )
    sync.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per MLflow call (default 10)"
    )
    compare = verbs.add_parser(
        "compare", help="two versions on the same evaluation: scores, difference, interval"
    )
    compare.add_argument("name")
    compare.add_argument("a", help="version number or alias (the champion)")
    compare.add_argument("b", help="version number or alias (the challenger)")
    compare.add_argument(
        "--episodes", type=int, default=50, help="samples: DQN episodes on fresh seeds (default 50)"
    )
    compare.add_argument("--json", action="store_true", help="the JSON line only")
    history = verbs.add_parser(
        "history", help="every registration and alias move of a model, oldest first"
    )
    history.add_argument("name")
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    export = verbs.add_parser(
        "export",
        help="a version in a standard format (ONNX for DQN policies, XGBoost's own for "
        "XGBoost), with model.json: its inputs, outputs, metrics and fingerprints",
    )
    export.add_argument("name")
    export.add_argument("ref", nargs="?", default="production", help="version or alias")
    export.add_argument("directory", help="a new or empty folder to write")
    export.add_argument("--format", default=None, help="the kind's format (default: its first)")
    # `models --store X list` and `models list --store X`
    for verb in (listing, show, promote, sync, compare, history, export):
        verb.add_argument("--store", default=argparse.SUPPRESS, help="model store URI")


def run(args: argparse.Namespace) -> int:
    registry = ModelRegistry(args.store, create=False)
    if args.verb == "list":
        return _list_models(registry, args)
    elif args.verb == "show":
        mv = registry.get(args.name, args.ref)
        body = {
            **mv.__dict__,
            "aliases": [a for a, v in registry.aliases(mv.name).items() if v == mv.version],
        }
        print(json.dumps(body, indent=2, sort_keys=True))
    elif args.verb == "promote":
        if args.mlflow:
            from rayline import mlflow_sync

            mlflow_sync.check_setting(args.mlflow, "--mlflow")  # before the alias moves
        code = _promote(registry, args)
        if args.mlflow:
            mlflow_sync.mirror(args.mlflow, registry, args.name)
        return code
    elif args.verb == "sync":
        return _sync(registry, args)
    elif args.verb == "compare":
        from rayline.compare import compare

        _check_samples(args.episodes)
        comparison = compare(registry, args.name, args.a, args.b, args.episodes)
        if not args.json:
            _print_comparison(comparison)
        print(json.dumps(comparison.as_json()))
    elif args.verb == "export":
        from rayline.export import export_model

        described = export_model(registry, args.name, args.ref, args.directory, args.format)
        files = ", ".join([*described["files"], "model.json"])
        print(
            f"exported {args.name} v{described['version']} as {described['format']}: "
            f"{files} in {args.directory}"
        )
    elif args.verb == "history":
        for entry in registry.history(args.name):
            print(json.dumps(entry, sort_keys=True) if args.json else _history_line(entry))
    return 0


def _promote(registry: ModelRegistry, args: argparse.Namespace) -> int:
    """Move the alias; with --gate only if the candidate beats the alias's holder."""
    if not args.gate:
        mv = registry.promote(args.name, args.ref, args.alias)
        print(f"{args.alias} -> {mv.name} v{mv.version}")
        return 0
    from rayline.compare import promote_gated

    _check_samples(args.episodes)
    if not (math.isfinite(args.min_delta) and args.min_delta >= 0):
        raise ConfigError(f"--min-delta: expected a finite number >= 0, got {args.min_delta}")
    outcome = promote_gated(
        registry, args.name, args.ref, args.alias, args.min_delta, args.episodes
    )
    if not outcome.promoted:
        print(f"rayline: {outcome.message}", file=sys.stderr)
        return GATE_REFUSED
    print(outcome.message)
    return 0


def _sync(registry: ModelRegistry, args: argparse.Namespace) -> int:
    """Mirror each model; one line per change. Exit 1 if MLflow did not answer."""
    from rayline import mlflow_sync

    if not args.mlflow:
        raise ConfigError("models sync: --mlflow URI (or $MLFLOW_TRACKING_URI) is required")
    mlflow_sync.check_setting(args.mlflow, "--mlflow")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 600):
        raise ConfigError(f"--timeout: expected seconds in (0, 600], got {args.timeout}")
    names = [args.name] if args.name else registry.names()
    for name in names:
        registry.get(name)  # a model this store does not have: exit 2, named
    client = mlflow_sync.client(args.mlflow, args.timeout)
    where = mlflow_sync.shown(args.mlflow)
    for name in names:
        try:
            changes = mlflow_sync.sync_model(client, registry, name)
        except Exception as exc:
            print(
                f"rayline: {name} not synced to {where}: {mlflow_sync.reason(exc)}",
                file=sys.stderr,
            )
            return 1
        print(f"{name}: " + ("; ".join(changes) if changes else f"in step with {where}"))
    return 0


def _check_samples(samples: int) -> None:
    if not 2 <= samples <= 100_000:
        raise ConfigError(f"--episodes: expected 2..100000, got {samples}")


def _print_comparison(comparison) -> None:
    low, high = comparison.ci95
    print(f"{'version':>10}  {comparison.metric}")
    for side in (comparison.a, comparison.b):
        print(f"{'v' + str(side['version']):>10}  {side['score']:.4g}")
    print(
        f"delta (b better by) {comparison.delta:.4g}, 95% interval [{low:.4g}, {high:.4g}], "
        f"n={comparison.n}: better is {comparison.better}"
    )


def _history_line(entry: dict) -> str:
    """One event for a person: time, event, what it moved (and the gate's figures), who."""
    event, comparison = entry.get("event", "?"), entry.get("comparison")
    gate = ""
    if isinstance(comparison, dict) and "ci95" in comparison:
        low, high = comparison["ci95"]
        gate = f"; delta {comparison['delta']:.4g}, 95% [{low:.4g}, {high:.4g}]"
    if event == "promoted":
        was = entry.get("previous")
        what = f"{entry.get('alias')} -> v{entry.get('version')}" + (
            f" (was v{was})" if was else ""
        )
    elif event == "promotion_refused":
        what = f"{entry.get('alias')}: v{entry.get('version')} refused, v{entry.get('holder')} kept"
    elif event == "registered":
        what = f"v{entry.get('version')} ({entry.get('kind')})"
    elif event == "rolled_back":
        what = f"{entry.get('alias')}: v{entry.get('version')} removed: {entry.get('reason')}"
    else:
        what = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("time", "event", "who"))
    who = entry.get("who", {})
    return f"{entry.get('time', '?')}\t{event}\t{what}{gate}\t{who.get('user', '?')}@{who.get('host', '?')}"


def _list_models(registry: ModelRegistry, args: argparse.Namespace) -> int:
    """One line per version; a version that cannot be read is listed as broken with its
    reason, and never hides the others."""
    names = registry.names()
    if args.name and args.name not in names:
        known = ", ".join(names) if names else "none"
        raise RegistryError(
            f"model {args.name!r} is not registered in {args.store} (registered: {known})"
        )
    if not names:
        print(f"no models registered in {args.store}")
    broken = 0
    for name in [args.name] if args.name else names:
        aliases, alias_problems = registry.aliases_checked(name)
        since = registry.alias_since(name)
        for problem in alias_problems:
            broken += 1
            print(f"{name}\t-\tBROKEN\t{problem}")
        for version in registry.versions(name):
            try:
                mv = registry.get(name, version)
            except RegistryError as exc:
                broken += 1
                print(f"{name}\tv{version}\tBROKEN\t{exc}")
                continue
            mine = [
                f"{a} (since {since[a]})" if a in since else a
                for a, v in aliases.items()
                if v == mv.version
            ]
            print(f"{mv.name}\tv{mv.version}\t{mv.kind}\t{mv.created_at}\t{', '.join(mine)}")
    if broken and args.strict:
        print(f"rayline: {broken} broken version(s) or alias(es)", file=sys.stderr)
        return BROKEN_MODELS
    return 0
