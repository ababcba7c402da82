"""The `rayline` command: train / sweep / models / serve / data.

Bad input is one line on stderr and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rayline import __version__, metrics_export, models_command, serve_command
from rayline.config import ConfigError, DataError, parse_overrides
from rayline.memory import ALLOCATOR_ENV, cap_arenas, use_system_arrow_pool
from rayline.startup import init_ray
from rayline.store import DEFAULT_STORE_URI, RegistryError

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: same one-line form, exit 2
        self.exit(USAGE_ERROR, f"rayline: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rayline", description="Distributed RL and ML pipelines on Ray.")
    parser.add_argument("--version", action="version", version=f"rayline {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_train_commands(commands)
    models_command.add_parser(commands, _Parser)
    _add_serve_command(commands)
    _add_inspection_commands(commands)
    _add_data_commands(commands)
    return parser


def _add_train_commands(commands) -> None:
    """`rayline train and sweep`."""
    for name, text in (
        ("train", "train one pipeline run (a one-trial Tune run)"),
        ("sweep", "sweep a pipeline's hyper-parameters with Ray Tune"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "pipeline",
            help="a pipeline YAML file, or a built-in pipeline's name (`rayline pipelines list`)",
        )
        _add_overrides(sub)
        sub.add_argument(
            "--address",
            default=None,
            help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)",
        )
        sub.add_argument(
            "--resume",
            action="store_true",
            help="continue the interrupted run of the same run.name from its checkpoints",
        )
        metrics_export.add_arguments(sub, metrics_export.TRAIN_METRICS_PORT)


def _add_serve_command(commands) -> None:
    """`rayline serve`."""
    serve_cmd = commands.add_parser(
        "serve", help="serve every promoted model over HTTP with Ray Serve"
    )
    serve_cmd.add_argument(
        "--store",
        default=os.environ.get("RAYLINE_STORE", DEFAULT_STORE_URI),
        help="model store URI (default: $RAYLINE_STORE or ./artifacts)",
    )
    serve_cmd.add_argument(
        "--alias", default="production", help="serve each model's version with this alias"
    )
    serve_cmd.add_argument(
        "--models", default="", help="comma-separated model names (default: all with the alias)"
    )
    serve_cmd.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)"
    )
    serve_cmd.add_argument(
        "--port",
        type=metrics_export.port_number(1),
        default=8000,
        help="port to answer on (default 8000)",
    )
    serve_cmd.add_argument(
        "--allow-no-key",
        action="store_true",
        help="answer on a --host beyond loopback without an API key (refused otherwise)",
    )
    serve_cmd.add_argument(
        "--address", default=None, help="Ray cluster to join (default: a new local Ray)"
    )
    serve_cmd.add_argument(
        "--replicas",
        type=_replica_count,
        default=1,
        help="gateway replicas, each holding every model: one killed, the others answer "
        "while it is replaced (default 1)",
    )
    serve_cmd.add_argument(
        "--api-key-file",
        default=os.environ.get("RAYLINE_API_KEY_FILE"),
        help="require this file's key as the X-API-Key header on every route but /healthz "
        "(default: $RAYLINE_API_KEY_FILE, else $RAYLINE_API_KEY's value, else no key)",
    )
    serve_cmd.add_argument(
        "--canary-fraction",
        type=_canary_share,
        action="append",
        default=[],
        metavar="NAME=F",
        help="send the share F (0..1) of model NAME's requests to the version its canary "
        "alias points at; rolled back on its own if it answers worse (repeatable)",
    )
    serve_cmd.add_argument(
        "--shadow",
        action="append",
        default=[],
        metavar="NAME",
        help="send a copy of every request of model NAME to the version its canary alias "
        "points at, off the request's path, and measure how alike the answers are "
        "(never answered to the client; repeatable)",
    )
    serve_cmd.add_argument(
        "--prediction-log",
        default="",
        metavar="URI",
        help="keep a sample of requests and answers as Parquet files under URI (a path, "
        "s3:// or gs://), partitioned by model, version and date; never a header",
    )
    serve_cmd.add_argument(
        "--prediction-log-sample",
        type=float,
        default=0.01,
        metavar="F",
        help="with --prediction-log: the share of requests logged (default 0.01)",
    )
    serve_cmd.add_argument(
        "--prediction-log-flush-s",
        type=_flush_seconds,
        default=10.0,
        metavar="S",
        help="with --prediction-log: seconds between a replica's writes, one file per "
        "model, version and date each (default 10; 1 to 3600)",
    )
    serve_cmd.add_argument(
        "--mlflow",
        default="",
        metavar="URI",
        help="keep this MLflow Model Registry in step with the served models while serving "
        "(a canary the replicas roll back, a promotion made elsewhere), checked every 10 s "
        "from this process, which holds MLflow's credentials (docs/mlflow.md)",
    )
    serve_cmd.add_argument(
        "--no-direct",
        action="store_true",
        help="answer through Serve's HTTP proxy instead of directly from the gateway replica "
        "(direct is the default on a local Ray: several times faster)",
    )
    metrics_export.add_arguments(serve_cmd, metrics_export.SERVE_METRICS_PORT)


def _add_inspection_commands(commands) -> None:
    """`rayline config show, runs list / show, pipelines list`."""
    config = commands.add_parser("config", help="every config key of a pipeline, with its docs")
    config_verbs = config.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    config_show = config_verbs.add_parser(
        "show", help="a pipeline's config keys: type, default and what each one does"
    )
    config_show.add_argument(
        "pipeline",
        help="a pipeline family (dqn, xgboost, ...), a built-in pipeline or a pipeline YAML file",
    )
    runs = commands.add_parser("runs", help="past runs: how they ended, best metric, model")
    runs_verbs = runs.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    runs_list = runs_verbs.add_parser("list", help="every run under the storage path, newest first")
    runs_show = runs_verbs.add_parser("show", help="one run, with each trial, as JSON")
    runs_show.add_argument("name", help="the run's name (run.name)")
    for verb in (runs_list, runs_show):
        verb.add_argument(
            "--storage",
            default="./ray_results",
            help="where runs are kept: run.storage_path, a path or s3://, gs:// URI "
            "(default ./ray_results)",
        )
    builtin = commands.add_parser("pipelines", help="the pipelines that ship with rayline")
    builtin_verbs = builtin.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    builtin_verbs.add_parser("list", help="each built-in pipeline: name, family and what it does")
    _add_overrides(config_show)


def _add_data_commands(commands) -> None:
    """`rayline data: the example data sets`."""
    data = commands.add_parser("data", help="write example data sets")
    data_verbs = data.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    movielens = data_verbs.add_parser(
        "movielens",
        help="write DIR/ratings/ratings.csv: a small rating set in MovieLens's format "
        "(synthetic, offline) for the recommender pipelines",
    )
    movielens.add_argument("directory", help="where to write the ratings folder")
    movielens.add_argument("--users", type=int, default=200, help="users (default 200)")
    movielens.add_argument("--items", type=int, default=150, help="items (default 150)")
    movielens.add_argument("--seed", type=int, default=0)
    make_ratings = data_verbs.add_parser(
        "make-ratings",
        help="write DIR/ratings.parquet: skewed synthetic ratings of any size (power-law "
        "item popularity, log-normal user activity), seeded, for benchmarks at scale",
    )
    make_ratings.add_argument("directory", help="where to write ratings.parquet")
    make_ratings.add_argument("--users", type=int, required=True)
    make_ratings.add_argument("--items", type=int, required=True)
    make_ratings.add_argument("--ratings", type=int, required=True)
    make_ratings.add_argument("--seed", type=int, default=0)
    export = data_verbs.add_parser(
        "export-sklearn",
        help="write one of scikit-learn's bundled data sets (offline) as DIR/NAME.parquet",
    )
    export.add_argument("name", help="breast_cancer, wine, digits or diabetes")
    export.add_argument("directory", help="where to write NAME.parquet")
    shapes = data_verbs.add_parser(
        "make-shapes",
        help="write DIR/shapes: PNG circles, squares and triangles in train/ and val/ class "
        "folders, an image-classification set for the transfer pipeline",
    )
    shapes.add_argument("directory", help="where to write the shapes folder")
    shapes.add_argument("--per-class", type=int, default=60, help="images per class (default 60)")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    shapes.add_argument("--seed", type=int, default=0)
    scenes = data_verbs.add_parser(
        "make-shape-scenes",
        help="write DIR/shape-scenes: PNG scenes of shapes with masks of their classes, "
        "a segmentation set for the fcn pipeline",
    )
    scenes.add_argument("directory", help="where to write the shape-scenes folder")
    scenes.add_argument("--count", type=int, default=200, help="images (default 200)")
    scenes.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    scenes.add_argument("--seed", type=int, default=0)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set learner.lr=0.0005 (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "sweep", "serve"):  # a driver that may run for weeks
        cap_arenas()
        use_system_arrow_pool()
    try:
        if args.command in ("train", "sweep"):
            return _train(args, sweep=args.command == "sweep")
        if args.command == "models":
            return models_command.run(args)
        if args.command == "serve":
            return serve_command.run(args)
        if args.command == "config":
            return _config_show(args)
        if args.command == "runs":
            return _runs(args)
        if args.command == "pipelines":
            return _pipelines_list()
        return _data(args)
    except (ConfigError, DataError, RegistryError) as exc:
        print(f"rayline: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("rayline: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rayline ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _replica_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= count <= 64:
        raise argparse.ArgumentTypeError(f"expected 1 to 64 replicas, got {count}")
    return count


def _flush_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 1.0 <= seconds <= 3600.0:  # nan fails this too
        raise argparse.ArgumentTypeError(f"expected 1 to 3600 seconds, got {text}")
    return seconds


def _canary_share(text: str) -> tuple[str, float]:
    name, sep, share = text.partition("=")
    try:
        fraction = float(share)
    except ValueError:
        fraction = float("nan")
    if not sep or not name or not 0.0 <= fraction <= 1.0:
        raise argparse.ArgumentTypeError(f"expected NAME=F with F from 0 to 1, got {text!r}")
    return name, fraction


def _data(args: argparse.Namespace) -> int:
    try:
        if args.verb == "make-shapes":
            from rayline.vision.data import make_shapes

            print(make_shapes(args.directory, args.per_class, args.size, args.seed))
        elif args.verb == "make-shape-scenes":
            from rayline.vision.data import make_shape_scenes

            print(make_shape_scenes(args.directory, args.count, args.size, args.seed))
        elif args.verb == "make-ratings":
            from rayline.recsys.data import make_ratings

            print(make_ratings(args.directory, args.users, args.items, args.ratings, args.seed))
        elif args.verb == "movielens":
            from rayline.recsys.data import write_example_ratings

            if args.users < 2 or args.items < 2:
                raise DataError("movielens: expected at least 2 users and 2 items")
            print(write_example_ratings(args.directory, args.users, args.items, args.seed))
        else:
            from rayline.boosting.data import export_sklearn

            print(export_sklearn(args.name, args.directory))
    except OSError as exc:  # a folder that cannot be made or written
        where = exc.filename or args.directory
        raise DataError(f"{where}: cannot write there ({exc.strerror or exc})") from None
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from rayline import config as configlib
    from rayline import pipelines
    from rayline.family import FAMILIES, get_pipeline

    if args.pipeline in FAMILIES:
        pipeline, values = get_pipeline(args.pipeline), None
    else:  # a file or a built-in pipeline
        try:
            pipelines.pipeline_file(args.pipeline)
        except ConfigError:
            raise ConfigError(
                f"{args.pipeline}: not a pipeline family ({', '.join(FAMILIES)}), "
                f"a built-in pipeline ({', '.join(pipelines.builtin_pipelines())}) or a file"
            ) from None
        pipeline, cfg = pipelines.load_pipeline(args.pipeline, parse_overrides(args.overrides))
        values = configlib.to_dict(cfg)
    print(f"# pipeline {pipeline.name}: {pipeline.config_cls.__name__}")
    for key, kind, default, doc in configlib.reference(pipeline.config_cls):
        value = default
        if values is not None:
            value = values
            for part in key.split("."):
                value = value[part]
        shown = json.dumps(value) if not isinstance(value, str) else value
        print(f"{key} = {shown}  ({kind})")
        if doc:
            print(f"    {doc}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from rayline import runs

    if args.verb == "show":
        print(json.dumps(runs.show(args.storage, args.name), indent=2, sort_keys=True, default=str))
        return 0
    listed = runs.list_runs(args.storage)
    if not listed:
        print(f"no runs under {args.storage}")
    for run in listed:
        started = run.get("started_at")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if started else "?"
        metric = run.get("metric") or "best"
        best = f"{metric}={run['best']:.6g}" if isinstance(run.get("best"), float | int) else "-"
        model = run.get("registered")
        model = f"{model['name']} v{model['version']}" if model else "not registered"
        print(
            f"{run['name']:<24} {run.get('pipeline', '?'):<11} {run['status']:<11} {when}  "
            f"trials={len(run['trials'])}  {best}  {model}"
        )
    return 0


def _pipelines_list() -> int:
    from rayline.config import read_yaml
    from rayline.pipelines import builtin_pipelines

    for name, path in builtin_pipelines().items():
        first = (path.read_text().splitlines() or [""])[0]
        about = first.lstrip("# ").strip() if first.startswith("#") else ""
        print(f"{name:<18} {read_yaml(path).get('pipeline', '?'):<11} {about}")
    return 0


def _train(args: argparse.Namespace, *, sweep: bool) -> int:
    from rayline import pipelines
    from rayline.startup import import_in_background, import_tensorboardx_without_torch, mark

    pipeline, cfg = pipelines.load_pipeline(args.pipeline, parse_overrides(args.overrides))
    mark("loaded")
    prepared = pipelines.prepare(pipeline, cfg, args.resume)
    joining = bool(args.address or os.environ.get("RAY_ADDRESS"))
    metrics = metrics_export.checked(args, joining_a_cluster=joining)
    mark("checked")

    # Tune's TensorBoard logger imports tensorboardX at the start of the run, before any
    # trial is scheduled: imported here, without torch (rayline.startup), and Tune while
    # Ray starts, which mostly waits on its own processes.
    import_tensorboardx_without_torch()
    importing = import_in_background(["ray.tune", "ray.tune.schedulers", "rayline.trial_lines"])
    scrape = init_ray(args.address, ALLOCATOR_ENV, metrics)  # the actors run for hours
    importing.join()
    mark("ray_ready")
    if scrape:
        print(scrape)
    try:
        outcome = pipelines.run(pipeline, cfg, sweep=sweep, resume=args.resume, prepared=prepared)
    except pipelines.Interrupted as exc:
        print(f"rayline: {args.command} interrupted: {exc}", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"rayline: {args.command} failed: {exc}", file=sys.stderr)
        return 1
    metric, _ = pipelines.pipeline_metric(pipeline, cfg)
    best, version = outcome.best, outcome.version
    print(f"best result: {metric}={best.metrics.get(metric)} ({best.path})")
    print(f"every trial's results: tensorboard --logdir {outcome.experiment}")
    if version is not None:
        print(f"registered {version.name} v{version.version} in {cfg.run.store_uri}")
    if outcome.promotion:
        print(outcome.promotion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
