"""Packaging, configs and the command line."""

import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from rayline import cli
from rayline.config import ConfigError, from_dict, load, parse_overrides
from rayline.rl.config import DQNConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_platform_is_the_standard_library():
    import platform

    import rayline

    assert platform.__file__.startswith(sysconfig.get_paths()["stdlib"])
    assert platform.python_version()  # a stdlib function
    assert rayline.__version__


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_pipeline_files_load():
    from rayline import config as configlib
    from rayline import pipelines

    names = sorted(os.listdir(os.path.join(REPO, "pipelines")))
    assert {name.split("-")[0].split(".")[0] for name in names} == {
        "dqn",
        "recommender",
        "xgboost",
        "transfer",
        "fcn",
    }
    for name in names:
        pipeline, cfg = pipelines.load_pipeline(os.path.join(REPO, "pipelines", name), {})
        assert cfg.pipeline == pipeline.name, name
        # every swept key exists and every domain is well formed
        pipelines.search_space(configlib.to_dict(cfg), cfg.sweep)
    assert load(DQNConfig, os.path.join(REPO, "pipelines", "dqn-cartpole.yaml")).pipeline == "dqn"


def test_overrides_parse_as_yaml_scalars():
    assert parse_overrides(
        ["learner.lr=0.001", "env.id=Acrobot-v1", "network.hidden_sizes=[32, 32]"]
    ) == {
        "learner.lr": 0.001,
        "env.id": "Acrobot-v1",
        "network.hidden_sizes": [32, 32],
    }
    for bad in ["learner.lr", "=3", "learner..lr=1", "a.b=[1,"]:
        with pytest.raises(ConfigError, match="bad override"):
            parse_overrides([bad])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"learner": {"lrr": 0.1}}, r"learner\.lrr: unknown key"),
        ({"learner": {"lr": "fast"}}, r"learner\.lr: expected a number, got 'fast'"),
        ({"learner": {"lr": -1.0}}, r"learner\.lr: expected a value > 0"),
        ({"learner": {"batch_size": 3.5}}, r"learner\.batch_size: expected an integer"),
        ({"replay": {"prioritized": "yes"}}, r"replay\.prioritized: expected true or false"),
        ({"replay": {"alpha": 2}}, r"replay\.alpha: expected a value <= 1"),
        (
            {"network": {"hidden_sizes": [64, "x"]}},
            r"network\.hidden_sizes\[1\]: expected an integer",
        ),
        ({"env": 3}, r"env: expected a mapping"),
        ({"sweep": {"mode": "best"}}, r"sweep\.mode: expected one of 'max', 'min'"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(DQNConfig, {"pipeline": "dqn", **data})


def test_config_values_are_typed():
    cfg = from_dict(DQNConfig, {"pipeline": "dqn", "learner": {"lr": 1, "batch_size": 32.0}})
    assert cfg.learner.lr == 1.0 and isinstance(cfg.learner.lr, float)
    assert cfg.learner.batch_size == 32 and isinstance(cfg.learner.batch_size, int)
    assert cfg.eval.solved_return == 475.0


@pytest.mark.parametrize(
    ("yaml_text", "args", "message"),
    [
        ("pipeline: dqn\nlearner: {lrr: 1}\n", [], "learner.lrr: unknown key"),
        ("pipeline: dqn\n", ["--set", "learner.lr=abc"], "learner.lr: expected a number"),
        ("pipeline: dqn\n", ["--set", "learner.lr"], "bad override 'learner.lr'"),
        (
            "pipeline: fcn\n",
            [],
            "data.path: expected a segmentation folder",
        ),
        (
            "pipeline: nope\n",
            [],
            "pipeline: expected one of dqn, fcn, recommender, transfer, xgboost, got 'nope'",
        ),
        ("pipeline: recommender\n", [], "data.path: expected the ratings to train on"),
        (
            "pipeline: recommender\ndata: {path: /nonexistent}\n",
            [],
            "/nonexistent: no such file or directory",
        ),
        ("learner: {}\n", [], "missing key 'pipeline'"),
        ("[1, 2\n", [], "not valid YAML"),
    ],
)
def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys, yaml_text, args, message):
    path = write(tmp_path, yaml_text)
    assert cli.main(["train", path, *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_file_and_bad_arguments_exit_2(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such pipeline file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["serve", "--store", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "store").mkdir()
    assert cli.main(["serve", "--store", str(tmp_path / "store")]) == 2
    assert "no model has alias 'production'" in capsys.readouterr().err


def test_console_script_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "pipeline: dqn\nlearner: {gamma: 7}\n")
    rayline = os.path.join(os.path.dirname(sys.executable), "rayline")
    proc = subprocess.run([rayline, "sweep", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rayline: error: learner.gamma: expected a value <= 1.0, got 7.0"


def test_sweep_space_rejects_unknown_keys(tmp_path):
    from rayline.config import SweepConfig, to_dict
    from rayline.pipelines import search_space

    cfg = DQNConfig()
    space = search_space(
        to_dict(cfg), SweepConfig(params={"learner.lr": {"loguniform": [1e-4, 1e-2]}})
    )
    assert hasattr(space["learner"]["lr"], "sample")
    with pytest.raises(ConfigError, match=r"sweep\.params\.learner\.lrr: no such config key"):
        search_space(to_dict(cfg), SweepConfig(params={"learner.lrr": {"choice": [1]}}))
    with pytest.raises(ConfigError, match=r"low < high"):
        search_space(to_dict(cfg), SweepConfig(params={"learner.lr": {"uniform": [2, 1]}}))
