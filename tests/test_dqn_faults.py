"""The DQN run when something dies: a collector, the learner, a replay shard, the
evaluator or the driver itself is killed (SIGKILL of the real process), and the run
recovers, resumes and counts what was lost. Apart from test_dqn_learning.py so the two
halves of the DQN's slow tests run on separate workers."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from rayline.config import to_dict
from rayline.family import CONSOLE_KEY
from rayline.memory import ALLOCATOR_ENV
from rayline.rl.apex import run_dqn
from rayline.rl.checkpoint import LEARNER_FILE, STATE_FILE
from rayline.rl.config import NetworkSpec
from rayline.rl.envs import EnvSpec
from rayline.startup import ray_data_env
from rayline.testing.processes import command, descendants, environment
from test_dqn_learning import tiny_config


@pytest.mark.slow
def test_resume_continues_with_the_same_counters(ray_session, tmp_path):
    checkpoints = []

    def report(metrics, directory):
        if directory:  # keep a copy, as Tune does
            kept = str(tmp_path / f"checkpoint_{len(os.listdir(tmp_path))}")
            shutil.copytree(directory, kept)
            checkpoints.append((metrics, kept))

    first = run_dqn(tiny_config(tmp_path, total_env_steps=1000), report)
    saved_metrics, saved_dir = checkpoints[-1]
    saved = json.loads(Path(saved_dir, STATE_FILE).read_text())["counters"]
    assert saved["env_steps_sampled"] == first["env_steps_sampled"]
    assert saved["learner_updates"] == first["learner_updates"] > 0

    checkpoints.clear()
    # A resumed run's trial never imports torch (385 MB for the rest of the run), the
    # kept evaluation's weights included: resumed in a fresh process, through `restore`.
    assert json.loads(Path(saved_dir, STATE_FILE).read_text())["kept_evaluation"]
    code = (
        "import json, sys\n"
        "import ray\n"
        "from rayline.config import from_dict\n"
        "from rayline.rl.apex import run_dqn\n"
        "from rayline.rl.config import DQNConfig\n"
        "ray.init(address=sys.argv[1])\n"
        "cfg = from_dict(DQNConfig, json.loads(sys.argv[2]))\n"
        "cfg.run.total_env_steps = 1200\n"
        "result = run_dqn(cfg, lambda metrics, directory: None, restore_dir=sys.argv[3])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'env_steps': result['env_steps_sampled']}))\n"
    )
    config = json.dumps(to_dict(tiny_config(tmp_path / "fresh")))
    fresh = subprocess.run(
        [sys.executable, "-c", code, ray_session["address"], config, saved_dir],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    outcome = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert outcome == {"torch": False, "env_steps": outcome["env_steps"]}, fresh.stderr[-2000:]
    assert outcome["env_steps"] >= 1200
    resumed = run_dqn(tiny_config(tmp_path, total_env_steps=1600), report, restore_dir=saved_dir)
    resumed_state = json.loads(Path(checkpoints[0][1], STATE_FILE).read_text())["counters"]
    assert resumed_state["env_steps_sampled"] >= saved["env_steps_sampled"]
    assert resumed_state["learner_updates"] >= saved["learner_updates"]
    assert resumed_state["evaluations"] >= saved["evaluations"]
    assert resumed["env_steps_sampled"] >= 1600
    # the resumed learner continued from the saved one: its update count carried on
    learner_state = torch.load(os.path.join(checkpoints[-1][1], LEARNER_FILE), weights_only=True)
    assert learner_state["learner_updates"] == resumed["learner_updates"] > saved["learner_updates"]
    steps_trained_after_resume = resumed["env_steps_sampled"] - saved["env_steps_sampled"]
    assert steps_trained_after_resume < 1600  # it did not start again from zero


def _actor_pids(actor_class: str) -> list[int]:
    """The pids of this Ray's live `actor_class` actors (asked of its GCS, so never an
    actor of another Ray on the machine, such as a parallel test's)."""
    return [
        actor["Pid"]
        for actor in ray._private.state.actors().values()
        if actor["ActorClassName"].endswith(actor_class)
        and actor["State"] == "ALIVE"
        and actor["Pid"]
    ]


KILLED_RUN_BUDGET = 6000


@pytest.fixture(scope="module")
def killed_run(ray_session, tmp_path_factory):
    """One tiny CartPole run (2 replay shards, snapshots every 0.5 s) in which the process
    of a collector, then the learner, then a replay shard, then the evaluator is killed
    with SIGKILL, and then a collector's and a replay shard's are stopped with SIGSTOP
    (hung, not dead), each kill once the run has recovered from the one before. Returns the
    final metrics, the pids killed or stopped by what was done, and the console lines it
    reported."""
    tmp_path = tmp_path_factory.mktemp("killed")
    cfg = tiny_config(tmp_path, total_env_steps=KILLED_RUN_BUDGET, report_every_s=0.5)
    # Short enough to find both hangs within the run, long enough that a busy actor on a
    # loaded 2-core machine is not taken for hung (1.5 s once killed the learner).
    cfg.run.hang_timeout_s = 4.0
    cfg.replay.snapshot_every_s, cfg.replay.shards = 0.5, 2
    snapshots = [tmp_path / "snap" / f"replay-{shard}.parquet" for shard in (0, 1)]
    killed: dict[str, int] = {}
    # (actor class, env steps past which, the counter of the kill before that must have
    # moved first). The collector goes soon after learning starts: its restart (a new
    # process importing torch, slow on a loaded machine) has most of the run to come back.
    plan = [
        ("CollectorActor", 600, None, signal.SIGKILL),
        ("LearnerActor", 1500, ("collector_restarts", 1), signal.SIGKILL),
        ("ReplayActor", 2000, ("learner_restarts", 1), signal.SIGKILL),
        ("EvaluatorActor", 2500, ("replay_restarts", 1), signal.SIGKILL),
        # A stopped collector stalls nothing (the other collects on), so it goes first,
        # with most of the run left for its kill and restart (Ray's restart of it may
        # still be under way when the shard stops); a stopped shard stalls the run until
        # it is found.
        ("CollectorActor", 2800, ("evaluations", 5), signal.SIGSTOP),
        ("ReplayActor", 3400, None, signal.SIGSTOP),
    ]

    said: list[str] = []

    def report(metrics: dict, directory) -> None:
        said.extend(metrics.get(CONSOLE_KEY, "").splitlines())
        for actor_class, at_env_steps, recovered, signal_number in plan:
            done = f"{actor_class} {signal_number.name}"
            if done in killed:
                continue
            due = metrics["env_steps_sampled"] >= at_env_steps
            if due and (recovered is None or metrics[recovered[0]] >= recovered[1]):
                if actor_class == "ReplayActor" and not all(p.exists() for p in snapshots):
                    return
                victim = _actor_pids(actor_class)[0]
                os.kill(victim, signal_number)
                killed[done] = victim
            return

    result = run_dqn(cfg, report, snapshot_uri=str(tmp_path / "snap" / "replay.parquet"))
    return result, killed, "\n".join(said)


@pytest.mark.slow
def test_a_collector_killed_mid_run_is_replaced_and_the_run_goes_on(killed_run):
    """SIGKILL of a collector's process: Ray restarts it, the run loop counts the restart,
    and the run reaches its budget."""
    result, killed, _ = killed_run
    assert "CollectorActor SIGKILL" in killed, "no collector was killed"
    assert result["collector_restarts"] >= 1
    assert result["env_steps_sampled"] >= KILLED_RUN_BUDGET


@pytest.mark.slow
def test_a_learner_killed_mid_run_is_rebuilt_from_its_kept_state(killed_run):
    """SIGKILL of the learner's process: the run loop rebuilds it from the state it keeps,
    counts the updates lost, and the run goes on to its budget and still learns."""
    result, killed, printed = killed_run
    assert "LearnerActor SIGKILL" in killed, "no learner was killed"
    assert result["learner_restarts"] == 1
    assert result["env_steps_sampled"] >= KILLED_RUN_BUDGET
    # Rebuilt from a kept state, not from scratch: at most state_every_updates (500 by
    # default) plus one call's updates were lost, and it went on updating after.
    assert 0 <= result["updates_lost"] <= 500 + 8
    assert result["learner_updates"] > result["updates_lost"]
    assert "learner lost: rebuilt from its state" in printed


@pytest.mark.slow
def test_a_replay_shard_killed_mid_run_is_rebuilt_from_its_snapshot(killed_run):
    """SIGKILL of one of two replay shards' process: the run loop rebuilds that shard from
    its latest background snapshot, counts the transitions lost, points the learner at
    it, and the run goes on to its budget."""
    result, killed, printed = killed_run
    assert "ReplayActor SIGKILL" in killed, "no replay shard was killed"
    # Two rebuilds in this run: this one, and the hung shard's (the test below).
    assert result["replay_restarts"] == 2 and result["replay_snapshots"] >= 2
    assert result["env_steps_sampled"] >= KILLED_RUN_BUDGET
    assert result["transitions_lost"] >= 0 and result["time_replay_snapshot_stall_s"] >= 0
    said = printed.split(" lost: rebuilt from its snapshot with ")
    assert len(said) == 3, printed
    for before, after in zip(said, said[1:]):
        assert before.rsplit("\n", 1)[-1] in ("replay shard 0", "replay shard 1")
        rebuilt_with = int(after.split()[0].replace(",", ""))
        assert rebuilt_with > 0, "a rebuilt shard started empty"


@pytest.mark.slow
def test_a_hung_collector_and_a_hung_replay_shard_are_killed_and_rebuilt(killed_run):
    """SIGSTOP of a collector's process, then of a replay shard's: neither dies, so no
    call fails; each stops answering its ping, is killed (run.hang_timeout_s) and rebuilt
    like a dead one (Ray restarts the collector, the run loop rebuilds the shard from its
    snapshot), and the run goes on to its budget."""
    result, killed, printed = killed_run
    assert {"CollectorActor SIGSTOP", "ReplayActor SIGSTOP"} <= set(killed), killed
    assert result["collector_restarts"] >= 2 and result["replay_restarts"] == 2, printed
    assert result["env_steps_sampled"] >= KILLED_RUN_BUDGET
    hung = [line for line in printed.splitlines() if "did not answer a ping in 4 s" in line]
    assert any(line.startswith("collector ") for line in hung), printed
    assert any(line.startswith("replay shard ") for line in hung), printed
    for pid in (killed["CollectorActor SIGSTOP"], killed["ReplayActor SIGSTOP"]):
        assert not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z", "still there"


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_an_evaluator_killed_mid_run_is_replaced_and_no_evaluation_is_dropped(killed_run):
    """SIGKILL of the evaluator's process: Ray restarts it and retries the evaluation in
    flight; every evaluation due is made (one per 500 env steps, and the final one)."""
    result, killed, _ = killed_run
    assert "EvaluatorActor SIGKILL" in killed, "no evaluator was killed"
    assert result["evaluations"] >= KILLED_RUN_BUDGET // 500
    assert result["env_steps_sampled"] >= KILLED_RUN_BUDGET


def test_recovery_rebuilds_what_died_and_raises_a_failure_of_the_calls_own(ray_session, tmp_path):
    """The driver's recovery phase alone: a learn call that met a dead learner is undone
    once the learner is rebuilt (a new epoch, the restart counted and said); an
    evaluation that failed on its own, with every actor alive, raises its error."""
    from rayline.rl.apex import EvalCall, LearnCall, Run

    run = Run(tiny_config(tmp_path), lambda metrics, directory: None, None, None)
    try:
        stats, weights = run.fleet.learner.train.remote(1)
        ray.kill(run.fleet.learner)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(stats)
        old_learner, serial = run.fleet.learner, run.weights.serial
        assert run.recover(stats, LearnCall(weights), None) is True
        assert run.epoch == 1 and run.fleet.learner is not old_learner
        assert run.state.counters.learner_restarts == 1 and run.weights.serial == serial + 1
        assert any("learner lost: rebuilt" in line for line in run.state.console)
        assert ray.get(run.fleet.learner.weights.remote())  # the new one answers
        bad = run.fleet.evaluator.evaluate.remote([ray.put({"nope": 0})], 1, 0)
        with pytest.raises(ray.exceptions.RayTaskError):
            run.recover(bad, EvalCall(0, bad), None)
        assert run.epoch == 1
    finally:
        run.fleet.kill()


def test_a_restarted_collector_never_acts_with_its_initial_weights(ray_session):
    """A call without weights reaching a collector that has none (Ray restarted it) is
    refused, so the run loop sends the current weights first; only before any learning
    (`untrained`: the learner's weights are a random initialisation too) does it act
    with its own."""
    from rayline.rl.collector import CollectorActor
    from rayline.rl.replay import ReplayActor

    env = EnvSpec("CartPole-v1")
    spec = NetworkSpec([4], 2, [8], dueling=False)
    collector = CollectorActor.remote(
        env=env, network=spec, num_envs=1, epsilons=[0.1], n_step=1, gamma=0.99
    )
    replay = ReplayActor.remote(capacity=100, obs_shape=(4,), obs_dtype=np.float32)
    refused = ray.get(collector.collect.remote(replay, 16, None, 0))
    assert refused.needs_weights and ray.get(replay.size.remote()) == 0
    before_learning = ray.get(collector.collect.remote(replay, 16, None, 0, True))
    assert before_learning.env_steps >= 16 and not before_learning.needs_weights
    assert ray.get(collector.collect.remote(replay, 16, None, 16)).needs_weights
    torch.manual_seed(0)
    from rayline.rl.networks import build_q_network

    weights = {k: v.numpy() for k, v in build_q_network(spec).state_dict().items()}
    done = ray.get(collector.collect.remote(replay, 16, [ray.put(weights)], 0))
    assert done.env_steps >= 16 and not done.needs_weights
    again = ray.get(collector.collect.remote(replay, 16, None, 16))  # it has them now
    assert again.env_steps >= 16 and again.incarnation == done.incarnation
    ray.kill(collector)
    ray.kill(replay)


@pytest.mark.slow
def test_a_killed_driver_resumes_with_the_same_counters(ray_session, tmp_path):
    """`kill -9` of `rayline train` (not Ctrl-C) and of the Ray it started: `rayline train
    --resume` with the same run name, on another Ray (as a run resumed on a cluster by
    `ray job submit`), continues from the last checkpoint, never from zero, and finishes."""
    import yaml

    cfg = tiny_config(tmp_path, name="killed", total_env_steps=3500)
    config = to_dict(cfg)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(config))
    rayline = str(Path(sys.executable).parent / "rayline")
    experiment = tmp_path / "results" / "killed"
    printed = tmp_path / "first.out"
    first = subprocess.Popen(
        [rayline, "train", str(path), "--metrics-port", "0"],
        stdout=printed.open("w"),
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # what it printed outlives its kill
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(experiment.glob("*/checkpoint_*/state.json")):
        assert first.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.5)
    # Tune saves its experiment state after the checkpoint: kill once it has
    checkpointed_at = max(p.stat().st_mtime for p in experiment.glob("*/checkpoint_*/state.json"))
    while time.monotonic() < deadline and not any(
        p.stat().st_mtime > checkpointed_at for p in experiment.glob("experiment_state-*.json")
    ):
        time.sleep(0.2)
    # Every actor of the run starts with the allocator settings, inherited from the CLI (no
    # runtime env: one would keep them off the worker processes Ray starts ahead).
    actors = {pid: command(pid).split()[0] for pid in descendants(first.pid)}
    actors = {pid: title for pid, title in actors.items() if title.startswith("ray::")}
    assert {"ray::CollectorActor", "ray::LearnerActor", "ray::ReplayActor"} <= {
        title.split(".")[0] for title in actors.values()
    }, actors
    for pid, title in actors.items():
        if "Agent" in title:  # Ray's own agents get an environment Ray makes for them
            continue
        env = environment(pid)
        if env or os.path.exists(f"/proc/{pid}"):  # not one that exited since the listing
            assert ALLOCATOR_ENV.items() <= env.items(), title
            assert ray_data_env(1).keys() <= env.keys(), title
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
    first.wait()
    (results,) = experiment.glob("*/result.json")
    reported_before = len(results.read_text().splitlines())
    checkpointed = [
        json.loads(p.read_text())["counters"]["env_steps_sampled"]
        for p in experiment.glob("*/checkpoint_*/state.json")
    ]
    # Where Prometheus finds the run's own Ray: printed, on loopback, on a port Ray picked.
    assert re.search(
        r"metrics for Prometheus at http://127\.0\.0\.1:\d+/metrics", printed.read_text()
    )
    # Resumed on the test's Ray (a Ray of its own took 10-15 s of the suite's 2 cores).
    second = subprocess.run(
        [rayline, "train", str(path), "--resume"],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "RAY_ADDRESS": ray_session["address"]},
    )
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    after = []  # every report made after the kill, in whichever trial folder Tune used
    for path in experiment.glob("*/result.json"):
        lines = path.read_text().splitlines()
        after += lines[reported_before:] if path == results else lines
    steps = [json.loads(line)["env_steps_sampled"] for line in after]
    assert steps and max(steps) >= 3500, (steps, sorted(experiment.iterdir()))
    # The resumed trial went on from a checkpoint: no report after the kill below it.
    assert min(steps) >= min(checkpointed) > 0, (steps, checkpointed)
    listed = subprocess.run(
        [rayline, "runs", "show", "killed", "--storage", str(tmp_path / "results")],
        capture_output=True,
        text=True,
    )
    assert json.loads(listed.stdout)["status"] == "finished"
