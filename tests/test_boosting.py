import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray
import xgboost as xgb

from rayline import cli, pipelines
from rayline.boosting import metrics
from rayline.boosting.config import XGBoostConfig
from rayline.boosting.data import (
    export_sklearn,
    infer_task,
    read_label,
    read_table,
    split,
    to_table,
)
from rayline.boosting.model import BadRows, BoostedModel
from rayline.boosting.pipeline import load_data
from rayline.boosting.report import final_metrics, report_rounds
from rayline.boosting.train import BestRound, TreeParams, booster_params, fit
from rayline.config import ConfigError, DataError, from_dict
from rayline.store import ModelRegistry
from test_export import assert_boosted_parity, export


@pytest.fixture(scope="module")
def sklearn_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sklearn")
    for name in ("breast_cancer", "wine", "diabetes"):
        export_sklearn(name, str(directory))
    return directory


def write_parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


# --- data ---------------------------------------------------------------------------


def test_export_sklearn_writes_the_bundled_sets(sklearn_dir):
    cancer = pq.read_table(sklearn_dir / "breast_cancer.parquet")
    assert cancer.num_rows == 569 and cancer.num_columns == 31
    assert sorted(set(cancer.column("target").to_pylist())) == [0, 1]
    wine = pq.read_table(sklearn_dir / "wine.parquet")
    assert wine.num_rows == 178 and sorted(set(wine.column("target").to_pylist())) == [0, 1, 2]
    diabetes = pq.read_table(sklearn_dir / "diabetes.parquet")
    assert pa.types.is_floating(diabetes.schema.field("target").type)


def test_cli_export_unknown_set_exits_2(tmp_path, capsys):
    assert cli.main(["data", "export-sklearn", "iris-ish", str(tmp_path)]) == 2
    assert "unknown data set 'iris-ish'" in capsys.readouterr().err


def test_tasks_inferred_from_the_label():
    assert infer_task(np.array([0, 1, 1, 0])).kind == "binary"
    multi = infer_task(np.array([0, 2, 1, 2]))
    assert (multi.kind, multi.num_class, multi.objective) == ("multiclass", 3, "multi:softprob")
    assert infer_task(np.array([0.5, 3.0])).kind == "regression"
    assert infer_task(np.array([0, 1, 2]), "reg:squarederror").kind == "regression"


@pytest.mark.parametrize(
    "columns, options, message",
    [
        ({"x": [1.0, 2.0]}, {}, "no label column 'target'"),
        (
            {"x": ["a", "b"], "target": [0, 1]},
            {"categorical": "reject"},
            "feature 'x' is not numeric",
        ),
        ({"x": [1.0, float("inf")], "target": [0, 1]}, {}, "feature 'x' holds an infinity (row 1)"),
        ({"x": [1.0, 2.0], "target": ["no", "yes"]}, {}, "label column 'target' is not numeric"),
        ({"x": [1.0, 2.0], "target": [0, None]}, {}, "label column 'target' has 1 missing"),
        ({"x": [1.0, 2.0], "target": [0, 1]}, {"features": ["y"]}, "no feature column 'y'"),
    ],
)
def test_bad_tables_name_the_problem(columns, options, message):
    with pytest.raises(DataError, match=None) as error:
        to_table(pa.table(columns), label="target", **options)
    assert message in str(error.value)


def test_classification_labels_must_be_0_to_k_minus_1():
    with pytest.raises(DataError, match="must be the integers 0..K-1, got 1, 2"):
        infer_task(np.array([1, 2, 2, 1]))
    with pytest.raises(DataError, match="binary:logistic needs labels 0 and 1"):
        infer_task(np.array([0, 1, 2]), "binary:logistic")


def test_empty_and_unreadable_files(tmp_path):
    empty = write_parquet(
        tmp_path / "empty.parquet", x=pa.array([], pa.float64()), target=pa.array([], pa.int64())
    )
    with pytest.raises(DataError, match="has no rows"):
        read_table(empty)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot be read"):
        read_table(str(tmp_path / "junk.parquet"))
    with pytest.raises(DataError, match="no such file"):
        read_table(str(tmp_path / "missing.csv"))


def test_missing_values_and_categories(tmp_path):
    path = tmp_path / "mixed.csv"
    pacsv.write_csv(
        pa.table({"size": [1.0, None, 3.0], "colour": ["red", "blue", None], "target": [0, 1, 0]}),
        path,
    )
    table = to_table(read_table(str(path)), label="target")
    assert table.feature_types == ["q", "c"]
    assert table.categories == {"colour": ["blue", "red"]}
    assert np.isnan(table.features[1, 0]) and np.isnan(table.features[2, 1])
    assert table.features[0, 1] == 1.0  # "red" is code 1
    unseen = pa.table({"size": [1.0], "colour": ["green"], "target": [0]})
    with pytest.raises(DataError, match="category 'green' not seen in training"):
        to_table(unseen, label="target", categories=table.categories)


def test_split_is_seeded_and_disjoint(sklearn_dir):
    table = to_table(read_table(str(sklearn_dir / "wine.parquet")), label="target")
    train, valid = split(table, 0.25, seed=3)
    again, _ = split(table, 0.25, seed=3)
    assert len(train) + len(valid) == 178 and len(valid) == 44
    assert np.array_equal(train.features, again.features)
    rows = {tuple(r) for r in train.features}
    assert not any(tuple(r) in rows for r in valid.features)


def test_read_label_checks_a_parquet_schema_without_loading_it(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", x=[1.0, 2.0], s=["a", "b"], target=[0, 1])
    with pytest.raises(DataError, match="feature 's' is not numeric"):
        read_label(path, "target", None)
    assert list(read_label(path, "target", ["x"])) == [0, 1]
    with pytest.raises(DataError, match="no label column 'y'"):
        read_label(path, "y", None)


# --- metrics and training ------------------------------------------------------------


def test_metrics_on_hand_made_predictions():
    label = np.array([0, 0, 1, 1])
    prob = np.array([0.1, 0.4, 0.35, 0.8])
    # one of the four positive/negative pairs is ordered wrongly (0.4 > 0.35)
    assert metrics.auc(label, prob) == pytest.approx(0.75)
    expected = -np.mean(np.log([0.9, 0.6, 0.35, 0.8]))
    assert metrics.logloss(label, prob) == pytest.approx(expected)
    assert metrics.error(label, prob) == pytest.approx(0.25)
    assert metrics.auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert metrics.mlogloss(np.array([0, 1]), probs) == pytest.approx(-np.log(0.7 * 0.1) / 2)
    assert metrics.merror(np.array([0, 1]), probs) == 0.5
    assert metrics.rmse(np.array([1.0, 3.0]), np.array([2.0, 1.0])) == pytest.approx(np.sqrt(2.5))
    assert metrics.mae(np.array([1.0, 3.0]), np.array([2.0, 1.0])) == pytest.approx(1.5)


def cancer_split(sklearn_dir):
    table = to_table(read_table(str(sklearn_dir / "breast_cancer.parquet")), label="target")
    return split(table, 0.2, seed=0)


def test_best_round_and_early_stopping_agree_with_the_evaluation_log(sklearn_dir):
    train, valid = cancer_split(sklearn_dir)
    task = infer_task(train.label)
    params = booster_params(TreeParams(eta=0.5), task, threads=1, seed=0)
    log: dict = {}

    class Keep(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            log["loss"] = list(evals_log["valid"]["logloss"])
            return False

    tracker = BestRound(task, patience=5)
    model = fit(
        params,
        task,
        train.dmatrix(),
        valid.dmatrix(),
        rounds=300,
        tracker=tracker,
        callbacks=[Keep()],
    )
    losses = np.array(log["loss"])
    assert model.best_iteration == int(np.argmin(losses))
    assert model.rounds == model.best_iteration + 6 < 300  # stopped 5 rounds after the best
    # our float64 metric agrees with XGBoost's own at the best round
    assert model.score(valid)["logloss"] == pytest.approx(losses.min(), rel=1e-5)


def test_model_files_round_trip_and_row_checks(sklearn_dir):
    train, valid = cancer_split(sklearn_dir)
    task = infer_task(train.label)
    params = booster_params(TreeParams(max_depth=3), task, threads=1, seed=0)
    model = fit(
        params, task, train.dmatrix(), valid.dmatrix(), rounds=20, tracker=BestRound(task, 0)
    )
    files = model.files()
    assert files["importance.png"].startswith(b"\x89PNG")
    assert b"pickle" not in files["model.json"]
    loaded = BoostedModel.from_files(files)
    assert np.array_equal(loaded.predict(valid.features), model.predict(valid.features))
    assert final_metrics(loaded, valid) == final_metrics(model, valid)
    row = dict(zip(model.feature_names, valid.features[0].tolist()))
    assert np.array_equal(model.rows_to_features([row]), valid.features[:1])
    assert np.isnan(model.rows_to_features([{**row, "mean_radius": None}])[0, 0])
    bad_rows = [
        ({**row, "colour": 1}, "unknown feature 'colour'"),
        ({k: v for k, v in row.items() if k != "mean_area"}, "missing feature 'mean_area'"),
        ({**row, "mean_area": float("inf")}, "NaN or infinite"),
        ({**row, "mean_area": "big"}, "expected a number, got a string"),
        ({**row, "mean_area": True}, "expected a number, got true"),
        ({**row, "mean_area": 1e300}, "outside float32's range"),
        ({**row, "mean_area": -(10**400)}, "an integer of 401 digits"),
    ]
    for bad, message in bad_rows:
        with pytest.raises(BadRows, match=message):
            model.rows_to_features([bad])


def test_report_rounds_hit_ashas_rungs():
    cfg = from_dict(
        XGBoostConfig,
        {"train": {"rounds": 300}, "sweep": {"grace_period": 10, "reduction_factor": 3}},
    )
    assert report_rounds(cfg) == {10, 30, 90, 270}
    assert report_rounds(from_dict(XGBoostConfig, {"train": {"report_every": 7}})) == 7


def test_validation_file_must_match(sklearn_dir, tmp_path):
    other = write_parquet(tmp_path / "v.parquet", x=[1.0], target=[0])
    cfg = from_dict(
        XGBoostConfig,
        {"data": {"path": str(sklearn_dir / "breast_cancer.parquet"), "valid_path": other}},
    )
    with pytest.raises((ConfigError, DataError), match="no feature column|differ"):
        load_data(cfg)


# --- the pipeline under Tune ---------------------------------------------------------


def sweep_config(tmp_path, data_path, name, **extra):
    spec = {
        "pipeline": "xgboost",
        "data": {"path": data_path, "label": "target"},
        "train": {"rounds": 40, "early_stopping_rounds": 10},
        "run": {
            "name": name,
            "storage_path": str(tmp_path / "results"),
            "store_uri": str(tmp_path / "store"),
        },
        "sweep": {
            "num_samples": 3,
            "scheduler": "asha",
            "grace_period": 5,
            "reduction_factor": 2,
            "params": {
                "params.eta": {"loguniform": [0.05, 0.5]},
                "params.max_depth": {"randint": [2, 6]},
            },
        },
    }
    for dotted, value in extra.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(XGBoostConfig, spec)


@pytest.mark.parametrize(
    "dataset, metric",
    [("breast_cancer", "valid_logloss"), ("wine", "valid_mlogloss"), ("diabetes", "valid_rmse")],
)
def test_sweep_registers_a_model_that_reproduces_its_trial(
    ray_session, tmp_path, sklearn_dir, dataset, metric
):
    cfg = sweep_config(tmp_path, str(sklearn_dir / f"{dataset}.parquet"), f"xgb-{dataset}")
    pipeline = pipelines.get_pipeline("xgboost")
    prepared = pipelines.prepare(pipeline, cfg)
    outcome = pipelines.run(pipeline, cfg, sweep=True, prepared=prepared)
    best, version = outcome.best, outcome.version
    assert len(outcome.results) == 3
    assert best.metrics["valid_loss"] == min(r.metrics["valid_loss"] for r in outcome.results)
    assert best.metrics[metric] == best.metrics["valid_loss"]
    registry = ModelRegistry(str(tmp_path / "store"))
    stored = registry.get(f"xgb-{dataset}")
    assert stored.kind == "xgboost" and set(stored.files) >= {
        "model.ubj",
        "model.json",
        "importance.png",
        "profile.json",
    }
    model = BoostedModel.from_files(registry.read_files(stored))
    # The drift reference: the training rows' deciles per feature, and the answers' shares.
    profile = json.loads(registry.read_file(stored, "profile.json"))
    train = prepared.inputs["train"]
    assert (
        profile["rows"] == len(train.features) and list(profile["features"]) == model.feature_names
    )
    for shares in (p["shares"] for p in profile["features"].values()):
        assert sum(shares) == pytest.approx(1.0)
    answers = model.answers(model.predict(train.features))
    if "classes" in profile["outputs"]:
        expected = [np.mean(answers == c) for c in profile["outputs"]["classes"]]
        assert profile["outputs"]["shares"] == pytest.approx(expected)
    # Loaded from the registry, the model scores exactly what its trial reported.
    scored = final_metrics(model, prepared.inputs["valid"])
    assert scored["valid_loss"] == best.metrics["valid_loss"] == version.metrics["valid_loss"]
    # the final model was checkpointed, not a round before the end (ray#40705)
    assert model.rounds == best.metrics["rounds"]
    # the run's results: the final checkpoint holds the importance chart and figures
    final = Path(best.checkpoint.path)
    importance = json.loads((final / "model.json").read_text())["importance_gain"]
    assert importance.keys() == set(model.feature_names) and max(importance.values()) > 0
    # Exported in XGBoost's own JSON, the pipeline's model gives the served answers.
    name, folder = f"xgb-{dataset}", tmp_path / "export"
    assert export(registry, name, "1", str(folder), "--format", "xgboost-json") == 0
    assert_boosted_parity(registry, name, 1, folder / "booster.json")
    assert (final / "importance.png").read_bytes().startswith(b"\x89PNG")
    assert list(Path(best.path).glob("events.out.tfevents.*")), "TensorBoard event files"


def test_optuna_search_proposes_from_results(ray_session, tmp_path, sklearn_dir):
    cfg = sweep_config(
        tmp_path, str(sklearn_dir / "wine.parquet"), "xgb-optuna", sweep__search="optuna"
    )
    outcome = pipelines.run(pipelines.get_pipeline("xgboost"), cfg, sweep=True)
    etas = {r.config["params"]["eta"] for r in outcome.results}
    assert len(outcome.results) == 3 and len(etas) == 3
    assert all(0.05 <= eta <= 0.5 for eta in etas)
    assert outcome.version.metrics["valid_loss"] == outcome.best.metrics["valid_loss"]
    grid = sweep_config(
        tmp_path,
        str(sklearn_dir / "wine.parquet"),
        "xgb-grid",
        sweep__search="optuna",
        sweep__params={"params.max_depth": {"grid": [2, 3]}},
    )
    with pytest.raises(ConfigError, match="optuna cannot search a grid"):
        pipelines.run(pipelines.get_pipeline("xgboost"), grid, sweep=True)


@pytest.mark.slow
def test_data_parallel_matches_single_process(ray_session, tmp_path, sklearn_dir):
    data_path = str(sklearn_dir / "breast_cancer.parquet")
    pipeline = pipelines.get_pipeline("xgboost")
    scores = {}
    for workers in (0, 2):
        cfg = sweep_config(
            tmp_path,
            data_path,
            f"xgb-dp{workers}",
            train__rounds=30,
            train__early_stopping_rounds=0,
            distributed__workers=workers,
            distributed__cpus_per_worker=0.45,  # a whole CPU stays free for Ray Data reads
            data__valid_path=data_path,
        )
        outcome = pipelines.run(pipeline, cfg, sweep=False)
        scores[workers] = outcome.best.metrics
    # Ray Data listed the Parquet footers on a pool the size of this Ray (rayline.startup.
    # ray_data_env), not on its 32 actors a read, whose queued ones each got a process.
    footer_readers = [
        actor
        for actor in ray._private.state.actors().values()
        if actor["ActorClassName"].endswith("FooterReader")
    ]
    assert 0 < len(footer_readers) <= 3 * ray.cluster_resources()["CPU"], len(footer_readers)
    # Same data, same trees up to floating-point order: within a small tolerance.
    assert scores[2]["valid_logloss"] == pytest.approx(scores[0]["valid_logloss"], rel=0.05)
    assert scores[2]["valid_error"] <= scores[0]["valid_error"] + 0.01
    assert scores[2]["rounds"] == 30
    # Workers that leave no whole CPU for Ray Data's reads are refused before any trial.
    crowded = sweep_config(
        tmp_path, data_path, "xgb-dp-crowded", distributed__workers=2, data__valid_path=data_path
    )
    with pytest.raises(ConfigError, match="leave -0.01 CPUs of this cluster for reading"):
        pipelines.run(pipeline, crowded, sweep=False)
    assert not (tmp_path / "results" / "xgb-dp-crowded").exists()


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    ray_session, tmp_path, sklearn_dir, monkeypatch
):
    # MLflow's file store, taken on the user's word (no SQLite schema to build in each of
    # the two processes): what is checked of it is the resumed run's continuity.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    data_path = str(sklearn_dir / "breast_cancer.parquet")
    pipeline_file = tmp_path / "sweep.yaml"
    pipeline_file.write_text(
        json.dumps(
            {
                "pipeline": "xgboost",
                "data": {"path": data_path},
                "train": {
                    "rounds": 400,
                    "early_stopping_rounds": 0,
                    "report_every": 50,
                    "checkpoint_every": 100,
                },
                "params": {"max_depth": 8, "eta": 0.01},
                "run": {
                    "name": "resumable",
                    "storage_path": str(tmp_path / "results"),
                    "store_uri": str(tmp_path / "store"),
                    "mlflow": {"tracking_uri": str(tmp_path / "mlruns")},
                },
                "sweep": {
                    "num_samples": 4,
                    "max_concurrent_trials": 1,
                    "params": {"params.subsample": {"uniform": [0.6, 1.0]}},
                },
            }
        )
    )
    rayline = str(Path(sys.executable).parent / "rayline")
    experiment = tmp_path / "results" / "resumable"
    # Both runs join the test's Ray, as `ray job submit` runs them on a cluster (a Ray
    # of their own took 6 CPU-seconds each to start and stop on the suite's 2 cores).
    monkeypatch.setenv("RAY_ADDRESS", ray_session["address"])
    first = subprocess.Popen(
        [rayline, "sweep", str(pipeline_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and sum(line.startswith("[") for line in lines) < 2:
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130, "".join(lines)
    finished_before = _finished_trials(experiment)
    assert 2 <= len(finished_before) < 4, "".join(lines)
    listed = subprocess.run(
        [rayline, "runs", "list", "--storage", str(tmp_path / "results")],
        capture_output=True,
        text=True,
    )
    assert listed.stdout.split()[:3] == ["resumable", "xgboost", "interrupted"], listed.stdout
    before = {name: (experiment / name / "result.json").read_text() for name in finished_before}

    second = subprocess.run(
        [rayline, "sweep", str(pipeline_file), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert len(_finished_trials(experiment)) == 4
    for name, text in before.items():  # finished trials were kept, not rerun
        assert (experiment / name / "result.json").read_text() == text
    assert "registered resumable v1" in second.stdout
    listed = subprocess.run(
        [rayline, "runs", "list", "--storage", str(tmp_path / "results")],
        capture_output=True,
        text=True,
    ).stdout
    assert listed.split()[:3] == ["resumable", "xgboost", "finished"] and "trials=4" in listed
    assert "resumable v1" in listed
    assert f"tensorboard --logdir {experiment}\n" in second.stdout
    # MLflow: the resumed run went on in the same sweep run and trial runs (Tune's
    # callback state), one run per trial, and its end tagged the registered trial.
    from mlflow import MlflowClient

    client = MlflowClient(str(tmp_path / "mlruns"))
    runs = client.search_runs([client.get_experiment_by_name("resumable").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("rayline.sweep") == "true"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == 4
    assert len({c.data.tags["rayline.trial_id"] for c in children}) == 4
    registered = [c for c in children if c.data.tags.get("rayline.registered") == "resumable v1"]
    assert len(registered) == 1
    assert {c.info.status for c in children} == {"FINISHED"}


def _finished_trials(experiment: Path) -> list[str]:
    return sorted(p.parent.parent.name for p in experiment.glob("*/checkpoint_*/importance.png"))


def test_bad_data_fails_in_the_driver_with_exit_2(tmp_path, capsys):
    path = write_parquet(tmp_path / "d.parquet", x=[1.0, 2.0, 3.0], target=[1, 2, 3])
    pipeline_file = tmp_path / "p.yaml"
    pipeline_file.write_text(f"pipeline: xgboost\ndata: {{path: {path}}}\n")
    assert cli.main(["train", str(pipeline_file), "--set", "objective=multi:softprob"]) == 2
    assert "must be the integers 0..K-1" in capsys.readouterr().err
