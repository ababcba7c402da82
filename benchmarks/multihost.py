"""rayline on a real multi-host Ray (tests/hosts.py: each node in its own network
namespace, `ray start` per host, token auth on, a laptop that reaches only the head),
driven as a cluster user drives one. Needs root and iproute2.

    .venv/bin/python benchmarks/multihost.py [--check-steps 40000]

1. auth: what the laptop reaches on the head (every listening socket) and what a client
   gets there with and without the token;
2. job + host_lost: `ray job submit` of the CartPole pipeline from the laptop (the
   learner on the head, a collector and a replay shard on each of two worker hosts,
   host_scenarios.job_hosts); worker1, which holds a shard by construction, killed at
   2,000 of 6,000 env steps (within a report of it, however fast the run goes), and a
   spare host with room for a shard joining, where the shard is rebuilt;
3. serve: deploy/serve.yaml deployed from the laptop with the job's policy (the front on
   the head, the gateway replica on a worker host), answers checked against a forward
   pass of the registered weights, the replica's host killed under load;
4. model: the CartPole pipeline with collectors on 1, 2 and 3 hosts, env steps/s
   measured against benchmarks/dqn_scale.py's model (its parts measured here first, the
   learner's where the runs place it: on the head with the replay, beside every host's
   daemons; all hosts share this machine's cores, so the model's cores line applies).
   Each run is `--check-steps` env steps: the model's rates are steady ones, and a
   run's fixed costs (the learner's process start and first fetch while the collectors
   wait) are not in it. 12,000-step runs (15-20 s) measured 600-640 env steps/s here,
   40,000-step runs 670-700, on the same cluster in the same hour.

Progress goes to stderr; the last stdout line is one JSON object: {"hosts", "job":
{"submitted", "registered", "solved", "wall_s"}, "host_lost": {"killed",
"killed_at_env_steps", "killed_mid_run", "continued", "finished_budget", "recovery_s",
"shard_rebuilt", "transitions_lost"}, "serve": {"answers_correct",
"replica_host_killed_back_s", "non_503_errors"}, "auth": {"refused_without_token", ...},
"model": {"predicted_vs_measured": [{"hosts", "predicted", "measured"}]}}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from common import emit, log

# The host cluster and its scenarios are test harnesses (tests/hosts.py, tests/host_scenarios.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

HERE = Path(__file__).resolve().parent


def cartpole_parts(seconds: float) -> dict:
    """dqn_scale's model parts for the CartPole pipeline, measured on this machine."""
    import ray
    import torch

    import dqn_scale
    from rayline.testing import init_local_ray

    torch.set_num_threads(1)
    cfg = dqn_scale.pipeline_config(dqn_scale.CARTPOLE)
    rate = dqn_scale.collection_rates(cfg, 3 * seconds)["float32"]
    init_local_ray(num_cpus=os.cpu_count() or 1)
    try:
        batches = dqn_scale.collected_batches(cfg, 24)
        one = dqn_scale.replay_rates(cfg, batches, 1, seconds)
        learner = dqn_scale.learner_actor_rate(cfg, batches, 1, seconds)
        parts = dqn_scale.model_parts(cfg, rate, one, learner)
        parts["t_driver_call"] = dqn_scale.driver_call_seconds()
    finally:
        ray.shutdown()
    return parts


# Where the scale runs put the learner and the replay: the head, as the README's cluster
# topology does (collectors on the worker hosts).
ON_HEAD = {"learner.resources": {"learner": 1}, "replay.resources": {"replay": 1}}


def join_cluster() -> None:
    """In a host's namespace: join the cluster that host_cluster started."""
    import ray

    ray.init(
        address=os.environ["RAY_ADDRESS"],
        _node_ip_address=os.environ["RAY_NODE_IP_ADDRESS"],
        logging_level="WARNING",
    )


def cluster_learner_rate(seconds: float) -> None:
    """In the head's namespace: the learner actor's updates/s fed by one shard, both
    placed on the head as the scale runs place them, with the cluster's daemons of every
    host running beside them; prints it."""
    import torch

    import dqn_scale

    torch.set_num_threads(1)
    join_cluster()
    cfg = dqn_scale.pipeline_config(dqn_scale.CARTPOLE, **ON_HEAD)
    batches = dqn_scale.collected_batches(cfg, 24)
    print(json.dumps({"updates_per_s": dqn_scale.learner_actor_rate(cfg, batches, 1, seconds)}))


def scale_run(collectors: int, steps: int, workdir: str) -> None:
    """In the head's namespace: one measured run (dqn_scale.measured_run) on the host
    cluster, a collector on each of `collectors` worker hosts; prints its env steps/s."""
    import dqn_scale

    join_cluster()
    overrides = {
        "collectors.num_collectors": collectors,
        "collectors.resources": {"collector": 1},
        **ON_HEAD,
    }
    print(json.dumps({"env_steps_per_s": dqn_scale.measured_run(overrides, steps, workdir)}))


def expected_actions(store: str, name: str, observations: list) -> list:
    """The registered policy's greedy actions, from its weights file."""
    import torch

    from rayline.rl.config import NetworkSpec
    from rayline.rl.networks import build_q_network
    from rayline.store import ModelRegistry

    registry = ModelRegistry(store, read_only=True, create=False)
    files = registry.read_files(registry.get(name))
    network = build_q_network(NetworkSpec(**json.loads(files["network.json"])))
    network.load_state_dict(torch.load(io.BytesIO(files["policy.pt"]), weights_only=True))
    with torch.no_grad():
        q = network(torch.tensor(observations, dtype=torch.float32))
    return q.argmax(dim=1).tolist()


def untrained_policy(store: str, name: str) -> None:
    """A CartPole policy of random weights, promoted (the serve part without the job's)."""
    import torch

    from rayline.rl.config import NetworkSpec
    from rayline.rl.networks import build_q_network
    from rayline.store import ModelRegistry

    spec = NetworkSpec([4], 2, [64, 64], dueling=True)
    buffer = io.BytesIO()
    torch.manual_seed(0)
    torch.save(build_q_network(spec).state_dict(), buffer)
    files = {"policy.pt": buffer.getvalue(), "network.json": json.dumps(spec.__dict__).encode()}
    ModelRegistry(store).register(name, files, kind="dqn", metrics={})


def job_part(workdir: Path, out: dict) -> None:
    import host_scenarios

    log("auth and job: the CartPole pipeline from the laptop, a shard's host killed ...")
    # Room for a second collector on each host: a lost host's bundle of the trial's
    # placement group has somewhere to go (docs/cluster.md).
    with host_scenarios.job_hosts(workdir / "job-hosts", collectors_per_host=2) as cluster:
        exposed = host_scenarios.exposure(cluster)
        job = host_scenarios.train_job(cluster, workdir)
    out["auth"] = {
        "refused_without_token": exposed["job_submit_refused_without_token"],
        "gcs_without_token": exposed["gcs_status_without_token"],
        "gcs_with_token": exposed["gcs_status_with_token"],
        "dashboard_without_token": exposed["dashboard_jobs_http_status_without_token"],
        "laptop_reaches": [
            f"{e['process']} {e['address']}:{e['port']}"
            for e in exposed["listening"]
            if e["laptop_connects"]
        ],
        "loopback_only": [f"{e['process']} :{e['port']}" for e in exposed["loopback_only"]],
    }
    log(f"  auth: {out['auth']}")
    out["job"] = {k: job[k] for k in ("submitted", "succeeded", "registered", "solved", "wall_s")}
    lost = (
        *("killed", "killed_at_env_steps", "killed_mid_run", "continued", "finished_budget"),
        *("recovery_s", "shard_rebuilt", "transitions_lost"),
    )
    out["host_lost"] = {k: job[k] for k in lost}
    log(f"  job: {out['job']}\n  host lost: {out['host_lost']}")


def serve_part(workdir: Path, out: dict) -> None:
    import host_scenarios
    from hosts import host_cluster
    from rayline.serving.settings import direct_ingress_env
    from rayline.store import ModelRegistry

    log("serve: deploy/serve.yaml from the laptop, the replica's host killed ...")
    store, name = str(workdir / "store"), "dqn-cartpole"
    registry = ModelRegistry(store)
    if name not in registry.names():
        untrained_policy(store, name)  # the job part did not run
    registry.promote(name, registry.get(name).version)
    observations = [[0.1, -0.2, 0.03, 0.4], [-0.3, 0.2, 0.1, -0.05], [0.0, 0.5, -0.1, -0.6]]
    expected = expected_actions(store, name, observations)
    with host_cluster(
        workdir / "serve-hosts",
        [{"num_cpus": 1}, {"num_cpus": 1}],
        head_cpus=0,
        env=direct_ingress_env(8000),
    ) as cluster:
        out["serve"] = host_scenarios.serve_job(cluster, Path(store), name, observations, expected)
    log(f"  serve: {out['serve']}")


def model_part(workdir: Path, out: dict, seconds: float, steps: int) -> None:
    import dqn_scale
    from hosts import host_cluster

    log("model: collectors on 1, 2 and 3 hosts, predicted vs measured ...")
    parts = cartpole_parts(seconds)
    cores = float(os.cpu_count() or 1)
    checks = []
    collector_host = {"num_cpus": 1, "resources": {"collector": 1}}
    with host_cluster(
        workdir / "scale-hosts", [collector_host] * 3, head_resources={"learner": 1, "replay": 1}
    ) as cluster:
        # The learner bounds these runs: its rate is the one it has where it runs, on
        # the head beside the daemons of every host, not on a private Ray.
        argv = [sys.executable, str(HERE / "multihost.py"), "--learner-rate"]
        argv += ["--seconds", str(seconds)]
        done = cluster.head.run(argv, env=cluster.driver_env(cluster.head), timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"learner rate: {done.stderr[-3000:]}")
        parts["learner_updates_per_s_local"] = parts["learner_updates_per_s"]
        parts["learner_updates_per_s"] = json.loads(done.stdout.strip().splitlines()[-1])[
            "updates_per_s"
        ]
        log(
            f"  learner updates/s: {parts['learner_updates_per_s']:.1f} on the cluster's head,"
            f" {parts['learner_updates_per_s_local']:.1f} on a private Ray"
        )
        for hosts in (1, 2, 3):
            argv = [sys.executable, str(HERE / "multihost.py"), "--scale-run", str(hosts)]
            argv += ["--check-steps", str(steps), "--workdir", str(workdir / "scale")]
            done = cluster.head.run(argv, env=cluster.driver_env(cluster.head), timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"scale run: {done.stderr[-3000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])["env_steps_per_s"]
            setup = f"{hosts} collector hosts"
            check = dqn_scale.check(setup, parts, hosts, 1, cores, steps, [measured])
            checks.append({"hosts": hosts, **check})
            log(f"  {checks[-1]}")
    out["model"] = {
        "predicted_vs_measured": checks,
        "max_abs_error": max(abs(c["error"]) for c in checks),
        "parts": {k: round(v, 6) for k, v in parts.items()},
    }


PARTS = ("job", "serve", "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="of " + ",".join(PARTS))
    parser.add_argument("--seconds", type=float, default=3.0, help="per measured part")
    parser.add_argument(
        "--check-steps", type=int, default=40000, help="env steps of each scale run"
    )
    parser.add_argument("--scale-run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--learner-rate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.learner_rate:
        cluster_learner_rate(args.seconds)
        return
    if args.scale_run:
        scale_run(args.scale_run, args.check_steps, args.workdir)
        return
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")

    from hosts import namespaces_unavailable

    unavailable = namespaces_unavailable()
    if unavailable:  # as measured: nothing, and why
        log(f"multihost: no host cluster here: {unavailable}")
        emit({"hosts": 0, "skipped": unavailable})
        return
    out: dict = {"hosts": 3}
    with tempfile.TemporaryDirectory(prefix="rl-multihost-") as tmp:
        workdir = Path(tmp)
        if "job" in parts:
            job_part(workdir, out)
        if "serve" in parts:
            serve_part(workdir, out)
        if "model" in parts:
            model_part(workdir, out, args.seconds, args.check_steps)
    emit(out)


if __name__ == "__main__":
    main()
