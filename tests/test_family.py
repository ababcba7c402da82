"""The house: a pipeline is its family's declaration plus one line in the runner's list,
and no module of rayline reaches back into one that imports it."""

import ast
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from ray import cloudpickle

from rayline import cli, family, pipelines
from rayline.config import RunConfig, SweepConfig
from rayline.family import Pipeline, model_metrics, trial_record
from rayline.serving.base import ServedKind
from rayline.store import ModelRegistry

PACKAGE = Path(pipelines.__file__).resolve().parent


@dataclasses.dataclass
class ToyConfig:
    pipeline: str = "toy"
    """Which pipeline this file configures."""
    target: float = 3.0
    """What the toy model learns."""
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(name="toy"))
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)


def toy_trainable(config: dict) -> None:
    from ray import tune

    if config["target"] < 0:
        raise ValueError("the toy cannot learn a negative target")
    tune.report({"error": abs(config["target"] - 3.0), "learned": config["target"]})


def register_toy(cfg, result, registry, inputs):
    return registry.register(
        cfg.run.name,
        {"value.json": str(result.metrics["learned"]).encode()},
        kind="toy",
        metrics=model_metrics(result),
        run=trial_record(result),
    )


class ToyValue:
    """The toy's served model: the value it learned."""

    def __init__(self, registry, name, ref="production"):
        self.version = registry.get(name, ref)
        self.value = float(registry.read_file(self.version, "value.json"))

    def times(self, factor: float) -> float:
        return self.value * factor


def toy_routes():
    from fastapi import APIRouter

    from rayline.serving.http import ModelsDep

    routes = APIRouter()

    @routes.get("/toy/{model}/value")
    async def value(model: str, models: ModelsDep, times: float = 1.0):
        version, value = await models.call(model, "toy", "times", times)
        return {"model": model, "version": version, "value": value}

    return routes


SERVED = {
    "toy": ServedKind("toy model", ToyValue, toy_routes, lambda url, name, version, registry: [])
}

PIPELINE = Pipeline(
    "toy",
    ToyConfig,
    toy_trainable,
    lambda cfg: {"cpu": 1},
    "error",
    "min",
    register_toy,
    serves=SERVED,
)


def test_a_pipeline_defined_here_runs_through_rayline_train(
    ray_session, tmp_path, monkeypatch, capsys
):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trials import nothing of it
    monkeypatch.setitem(family.FAMILIES, "toy", __name__)
    path = tmp_path / "toy.yaml"
    path.write_text(
        f"pipeline: toy\ntarget: 2.5\nrun: {{name: toy, storage_path: {tmp_path / 'results'}, "
        f"store_uri: {tmp_path / 'store'}}}\n"
    )
    assert cli.main(["train", str(path)]) == 0
    assert "registered toy v1" in capsys.readouterr().out
    version = ModelRegistry(str(tmp_path / "store")).get("toy")
    assert version.kind == "toy" and version.metrics["error"] == 0.5
    # A run whose every trial fails: exit 1, and `rayline runs` lists both as they ended.
    assert cli.main(["train", str(path), "--set", "target=-1", "--set", "run.name=broken"]) == 1
    capsys.readouterr()
    assert cli.main(["runs", "list", "--storage", str(tmp_path / "results")]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert listed["toy"].split()[1:3] == ["toy", "finished"], listed
    assert "error=0.5" in listed["toy"] and "toy v1" in listed["toy"]
    assert (
        listed["broken"].split()[1:3] == ["toy", "failed"] and "not registered" in listed["broken"]
    )
    assert cli.main(["runs", "show", "broken", "--storage", str(tmp_path / "results")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "negative target" in shown["error"] and shown["trials"][0]["status"] == "ERROR"
    assert cli.main(["runs", "show", "nope", "--storage", str(tmp_path / "results")]) == 2
    # run.promote: `always` moves the alias after registering; `gated` needs a family that
    # compares versions (the toy does not), refused before Ray starts.
    capsys.readouterr()
    assert cli.main(["train", str(path), "--set", "run.promote=gated"]) == 2
    assert "cannot compare versions yet" in capsys.readouterr().err
    assert cli.main(["train", str(path), "--set", "run.promote=always"]) == 0
    assert "production -> toy v2" in capsys.readouterr().out
    registry = ModelRegistry(str(tmp_path / "store"))
    assert registry.aliases("toy")["production"] == 2
    assert [e["event"] for e in registry.history("toy")][-2:] == ["registered", "promoted"]


def test_a_kind_served_by_a_family_defined_here_answers_its_route(
    ray_session, tmp_path, monkeypatch
):
    """The gateway names no kind: the toy family above declares its kind and route, and
    the Serve app rayline serve builds answers it, nothing outside this file changed."""
    import httpx
    from ray import serve

    from rayline.serving.app import build_app

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas import nothing of it
    monkeypatch.setitem(family.FAMILIES, "toy", __name__)
    monkeypatch.setitem(family.SERVING, "toy", __name__)
    registry = ModelRegistry(str(tmp_path / "store"))
    registry.register("toy", {"value.json": b"2.5"}, kind="toy", metrics={})
    registry.register("toy", {"value.json": b"3.0"}, kind="toy", metrics={})
    registry.promote("toy", 2)
    port = 18151
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"store_uri": str(tmp_path / "store")}), name="toy", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            answer = client.get("/toy/toy/value", params={"times": 2})
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"model": "toy", "version": 2, "value": 6.0}
            missing = client.get("/toy/nope/value")
            assert missing.status_code == 404 and "no toy model 'nope'" in missing.text
            assert "/toy/{model}/value" in client.get("/openapi.json").json()["paths"]
            listed = client.get("/models").json()["models"]
            assert [(m["name"], m["kind"], m["version"]) for m in listed] == [("toy", "toy", 2)]
    finally:
        serve.shutdown()


def test_a_run_whose_driver_was_killed_is_listed_as_interrupted(tmp_path):
    from rayline import runs

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    experiment = str(tmp_path / "results" / "killed")
    runs.started(experiment, "toy", "killed", False, "error", "min", resume=False)
    runs.record(experiment, driver={"host": socket.gethostname(), "pid": int(gone.stdout)})
    (found,) = runs.list_runs(str(tmp_path / "results"))
    assert found["name"] == "killed" and found["status"] == "interrupted"
    runs.record(experiment, driver={"host": socket.gethostname(), "pid": os.getpid()})
    assert runs.summary(experiment)["status"] == "running"


def _rayline_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every rayline module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules and name != "rayline"}


def test_the_module_graph_has_no_cycle():
    modules = _rayline_modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", " -> ".join([*trail, name, other])
            if other not in state:
                visit(other, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


# Imported once, before the forks: each module's own import is what is tested, and
# importing torch and Ray afresh for each of ~60 modules took most of a minute.
PRELOADED = [
    "numpy",
    "scipy",
    "pyarrow",
    "yaml",
    "PIL",
    "torch",
    "torchvision",
    "gymnasium",
    "xgboost",
    "fastapi",
    "ray",
    "ray.tune",
    "ray.serve",
    "ray.train",
    "ray.data",
]

FORK_EACH_IMPORT = """
import importlib, json, os, sys, traceback
for name in sys.argv[2].split(","):
    importlib.import_module(name)
failed = []
for name in sys.argv[1].split(","):
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print(json.dumps(failed))
"""


def test_every_module_imports_alone():
    """Each rayline module imports in a process that imported no other rayline module
    (a forked child of one that loaded only the third-party libraries)."""
    names = sorted(name for name in _rayline_modules() if name != "rayline")
    proc = subprocess.run(
        [sys.executable, "-c", FORK_EACH_IMPORT, ",".join(names), ",".join(PRELOADED)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, (failed, proc.stderr[-3000:])


def test_what_is_served_is_known_without_the_models_libraries():
    """`rayline serve` checks a store's models against every family's served kinds before
    Ray starts, and a replica loads only its models' predictors: neither pays for torch
    (1.5 s), scikit-learn (1.2 s) or XGBoost until a model of theirs is loaded."""
    code = (
        "import json, sys\n"
        "from rayline.family import served_kinds\n"
        "kinds = served_kinds()\n"
        "import rayline.boosting.predictor\n"  # what an XGBoost model's replica loads
        "heavy = [m for m in ('torch', 'sklearn', 'xgboost') if m in sys.modules]\n"
        "print(json.dumps([sorted(kinds), heavy]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kinds, heavy = json.loads(out.stdout)
    assert kinds == ["dqn", "image_classifier", "recommender", "segmenter", "xgboost"]
    assert heavy == [], f"imported before any model was loaded: {heavy}"


def test_each_family_serves_what_its_serving_module_declares():
    """FAMILIES and SERVING name the same families, and a pipeline's `serves` are the
    declarations `rayline serve` reads (one definition, not two that can drift)."""
    import importlib

    assert set(family.SERVING) == set(family.FAMILIES)
    for name, module in family.SERVING.items():
        declared = importlib.import_module(module).SERVED
        for kind, served in family.get_pipeline(name).serves.items():
            assert declared[kind] is served, (name, kind)
