"""The wheel as a user installs it: built from the repository, installed into a fresh
virtual environment outside it, and run from a folder that has no pipelines/.

The fresh environment installs the wheel alone (--no-deps) and reaches its dependencies
(Ray, torch, ...) through a path file naming this environment's site-packages: installing
them afresh takes minutes and a network. Only the wheel's own files are rayline there."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(base / "dist"),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = (base / "dist").glob("rayline-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies: this environment's site-packages, after the fresh one's own.
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    workdir = base / "elsewhere"
    workdir.mkdir()
    return venv, workdir


@pytest.mark.slow
def test_the_installed_package_is_the_wheel_and_carries_its_pipelines(installed):
    venv, workdir = installed
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import rayline; print(rayline.__file__)"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    listed = subprocess.run(
        [str(venv / "bin" / "rayline"), "pipelines", "list"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {line.split()[0] for line in listed.splitlines()}
    assert names == {p.stem for p in (ROOT / "pipelines").glob("*.yaml")}


@pytest.mark.slow
def test_the_installed_rayline_trains_a_built_in_pipeline(installed):
    venv, workdir = installed
    trained = subprocess.run(
        [
            str(venv / "bin" / "rayline"),
            "train",
            "dqn-cartpole",
            "--set",
            "run.total_env_steps=2000",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "registered dqn-cartpole v1" in trained.stdout
    # rayline's own lines, as a user reads them: the driver prints them, without Ray's
    # worker prefix, and without colour codes when the output is not a terminal.
    progress = [line for line in trained.stdout.splitlines() if "env_steps=" in line]
    assert progress and any(
        "stopped: reached total_env_steps" in line for line in trained.stdout.splitlines()
    )
    assert not any("pid=" in line for line in progress), progress
    assert "\x1b[" not in trained.stdout, trained.stdout[-2000:]
    assert (workdir / "artifacts" / "models" / "dqn-cartpole" / "1").is_dir()
    assert (workdir / "ray_results" / "dqn-cartpole" / "rayline_run.json").is_file()
