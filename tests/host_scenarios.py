"""rayline's cluster paths driven on a host cluster (tests/hosts.py) as a cluster
user drives them, each returning what it measured: tests/test_hosts.py asserts on these
figures and benchmarks/multihost.py prints them.

- `train_job`: `ray job submit` of `rayline train` from the laptop, the learner on the
  head and a collector and a replay shard on each worker host (`job_hosts`); a shard's
  host killed at a set point of the run, a spare host joining.
- `serve_job`: deploy/serve.yaml deployed from the laptop; answers checked; the gateway
  replica's host killed under a client's load.
- `exposure`: what the laptop reaches on the head, with and without the token.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from hosts import HEAD_ADDRESS, HostCluster, http_load
from rayline.store import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
"""The repository (runtime env, pipelines and deploy files are submitted from it)."""


def submit(cluster: HostCluster, entrypoint: list[str], *, token: bool = True, wait: bool = True):
    """`ray job submit` from the laptop, from the repository's root, as docs/cluster.md
    shows; without `token` as a client that lacks it."""
    argv = ["ray", "job", "submit", f"--address={cluster.dashboard_url}"]
    argv += [] if wait else ["--no-wait"]
    argv += ["--runtime-env", "deploy/runtime-env.yaml", "--", *entrypoint]
    env = {} if token else {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": ""}
    return cluster.laptop.run(argv, cwd=ROOT, env=env, timeout=300)


def snapshot_rows(folder: Path) -> int:
    """Transitions in the replay shards' latest background snapshots (0 before the first;
    each file appears whole: written aside, then renamed)."""
    total = 0
    for path in folder.glob("*.parquet"):
        with contextlib.suppress(OSError, pa.ArrowException):
            total += pq.read_metadata(path).num_rows
    return total


def latest_result(storage: Path) -> dict:
    """The trial's latest report (Tune's result.json, on storage every host reaches)."""
    lines = [
        line
        for path in storage.glob("**/result.json")
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # the line Tune is writing now
            continue
    return {}


COLLECTORS, SHARDS = 2, 2
"""The train job's collectors and replay shards."""
VICTIM, SPARE = "worker1", "worker3"
"""The host the lost-host scenario kills, and the one that joins after it."""


def job_hosts(root: Path, collectors_per_host: int = 1):
    """The train job's cluster: the learner's resource on the head, a collector's and a
    replay shard's on each of two worker hosts, and a spare host with room for a shard
    that joins only once the shards are placed (`HostCluster.start_later`). Each worker
    host has one
    shard's room and the run two shards, so each worker holds one: the victim holds a
    shard by construction, never by a listing that races the run. (One collector per
    host: the trial's placement group packs its bundles, so room for two on a host would
    put both collectors there; `collectors_per_host` 2 gives a lost host's collector
    bundle somewhere to go.)"""
    from hosts import host_cluster

    worker = {"num_cpus": 1, "resources": {"collector": collectors_per_host, "replay": 1}}
    spare = {"num_cpus": 0, "resources": {"replay": 1}, "later": True}
    return host_cluster(root, [worker, worker, spare], head_resources={"learner": 1})


def train_job(
    cluster: HostCluster, workdir: Path, budget: int = 6000, kill_at: int | None = 2000
) -> dict:
    """The CartPole pipeline submitted from the laptop to a `job_hosts` cluster, placed by
    custom resources; at `kill_at` env steps (None: never) the VICTIM host, which holds
    a replay shard, is killed; the SPARE host, where the shard is rebuilt, joins once both
    shards are placed."""
    storage, store = workdir / "results", workdir / "store"
    entrypoint = ["rayline", "train", "pipelines/dqn-cartpole.yaml"]
    for setting in (
        f"run.total_env_steps={budget}",
        f"run.storage_path={storage}",
        f"run.store_uri={store}",
        "run.report_every_s=0.5",
        "eval.every_env_steps=3000",
        "eval.episodes=5",
        "learner.resources={learner: 1}",
        "collectors.resources={collector: 1}",
        f"collectors.num_collectors={COLLECTORS}",
        f"replay.shards={SHARDS}",
        "replay.resources={replay: 1}",
        "replay.snapshot_every_s=1",
        f"replay.snapshot_dir={workdir / 'snapshots'}",
    ):
        entrypoint += ["--set", setting]
    started = time.monotonic()
    submitted = submit(cluster, entrypoint, wait=False)
    if submitted.returncode != 0:
        raise RuntimeError(f"ray job submit: {submitted.stdout[-2000:]}{submitted.stderr[-2000:]}")
    job_id = re.search(r"raysubmit_\w+", submitted.stdout).group(0)

    # The run's progress as the run itself writes it: its replay shards' background
    # snapshots (every second, on storage every host reaches). Tune's result.json lags
    # behind a busy driver: one run reported nothing between 1,792 and 6,144 env steps
    # (6 s; its driver shared the head's core with the learner), and a kill waited on
    # it came after the run had ended.
    # The spare joins once both shards have written a snapshot (both are placed, on the
    # two worker hosts), so the lost shard's rebuild need not wait for a node to start.
    deadline = time.monotonic() + 300
    at_kill: dict = {}
    progress, spare_started = 0, False
    while kill_at is not None:
        at_kill = latest_result(storage)
        progress = max(snapshot_rows(workdir / "snapshots"), at_kill.get("env_steps_sampled", 0))
        if not spare_started and len(list((workdir / "snapshots").glob("*.parquet"))) >= SHARDS:
            cluster.start_later(SPARE)
            spare_started = True
        if progress >= kill_at:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the job never reached {kill_at} env steps\n{cluster.log('head')}")
        time.sleep(0.1)
    killed_at = time.monotonic()
    phases = {"submitted_to_kill_s": round(killed_at - started, 1)}
    victim, recovery_s = None, None
    if kill_at is not None:
        victim = VICTIM
        cluster.kill(victim)
        if not spare_started:
            cluster.start_later(SPARE)
    while victim and recovery_s is None and time.monotonic() < killed_at + 240:
        now = latest_result(storage)  # the shard rebuilt and collection going on
        rebuilt = now.get("replay_restarts", 0) >= 1
        if rebuilt and now["env_steps_sampled"] > progress + 256:
            recovery_s = time.monotonic() - killed_at
        time.sleep(0.2)

    logs = cluster.laptop.run(
        ["ray", "job", "logs", f"--address={cluster.dashboard_url}", "--follow", job_id],
        timeout=600,
    )
    status = cluster.laptop.run(
        ["ray", "job", "status", f"--address={cluster.dashboard_url}", job_id], timeout=60
    )
    wall_s = time.monotonic() - started
    phases["kill_to_end_s"] = round(time.monotonic() - killed_at, 1)
    final = latest_result(storage)
    phases["run_wall_s"] = final.get("wall_s")
    first_step = final.get("first_env_step_unix_s", 0) - final.get("startup_trainable_unix_s", 0)
    phases["trainable_to_first_step_s"] = round(first_step, 1)
    try:
        registered = ModelRegistry(str(store), create=False, read_only=True).get("dqn-cartpole")
    except Exception:  # noqa: BLE001 - not registered is what this reports
        registered = None
    # Where the actors ran, once the run is over (ended ones included): for the record.
    collector_hosts = cluster.actors_by_host("CollectorActor", alive_only=False)
    shard_hosts = cluster.actors_by_host("ReplayActor", alive_only=False)
    restarts = final.get("replay_restarts", 0)
    return {
        "submitted": True,
        "succeeded": "succeeded" in status.stdout,
        "registered": registered is not None and "registered_eval_return" in registered.metrics,
        "solved": bool(registered and registered.metrics.get("solved")),
        "wall_s": round(wall_s, 1),
        "phases": phases,
        "collector_hosts": collector_hosts,
        "shard_hosts": shard_hosts,
        "killed": victim,
        "killed_at_env_steps": progress if victim else None,
        # The run itself met the loss: it was still going (a shard rebuilt in the run).
        "killed_mid_run": victim is not None and progress < budget and restarts >= 1,
        "continued": victim is not None
        and final.get("learner_updates", 0) > at_kill.get("learner_updates", 0),
        "finished_budget": final.get("env_steps_sampled", 0) >= budget,
        "recovery_s": None if recovery_s is None else round(recovery_s, 1),
        "shard_rebuilt": restarts >= 1 and "rebuilt from its snapshot" in logs.stdout,
        "replay_restarts": restarts,
        "transitions_lost": final.get("transitions_lost"),
        "env_steps_sampled": final.get("env_steps_sampled"),
        "log_tail": logs.stdout[-3000:],
    }


def serve_job(
    cluster: HostCluster,
    store: Path,
    model: str,
    observations: list,
    expected_actions: list,
    load_s: float = 30,
    replicas: int = 1,
) -> dict:
    """deploy/serve.yaml with `store` deployed from the laptop; the laptop's answers for
    `observations` against `expected_actions`; the gateway replica's host killed 5 s
    into `load_s` of a client's requests. With `replicas` > 1 the gateway keeps that
    many (Serve spreads them over the hosts), and the kill takes one of them. The
    cluster needs Serve's direct ingress flags in its nodes' environment and a head that
    schedules nothing (head_cpus=0)."""
    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    args = config["applications"][0]["args"]
    port = args["front_port"]
    # The head's own address: the laptop comes from outside.
    args.update(store_uri=str(store), front_host=HEAD_ADDRESS, poll_s=1)
    gateway = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Gateway")
    gateway["autoscaling_config"]["min_replicas"] = replicas
    gateway["autoscaling_config"]["max_replicas"] = max(replicas, 4)
    deployed = cluster.root / "serve.yaml"
    deployed.write_text(yaml.safe_dump(config))
    done = cluster.laptop.run(
        ["serve", "deploy", str(deployed), f"--address={cluster.dashboard_url}"], timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"serve deploy: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    path, body = f"/dqn/{model}/act", {"observations": observations}

    def load(seconds: float, name: str):
        out = cluster.root / f"{name}.jsonl"
        return http_load(cluster.laptop, HEAD_ADDRESS, port, path, body, seconds, out), out

    deadline = time.monotonic() + 120
    while True:  # until the replica is up and the front routes to it
        client, out = load(1, "first")
        client.wait()
        answers = [json.loads(line) for line in out.read_text().splitlines()]
        if any(a[2] == 200 for a in answers):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from the front: {answers[-3:]}\n{cluster.log('head')}")
    first = json.loads(next(a[3] for a in answers if a[2] == 200))
    replica_hosts = cluster.actors_by_host("Gateway")
    while len(replica_hosts) < replicas and time.monotonic() < deadline:
        time.sleep(1)
        replica_hosts = cluster.actors_by_host("Gateway")

    client, out = load(load_s, "load")
    time.sleep(5)
    killed_at = time.time()
    cluster.kill(replica_hosts[0])
    client.wait(timeout=load_s + 120)
    replies = [json.loads(line) for line in out.read_text().splitlines()]
    replaced_by = time.monotonic() + 60  # Serve brings the gateway back to `replicas`
    while len(cluster.actors_by_host("Gateway")) < replicas and time.monotonic() < replaced_by:
        time.sleep(1)
    last_failure = max((r[0] for r in replies if r[2] != 200), default=killed_at)
    back = [r for r in replies if r[2] == 200 and r[0] >= max(killed_at, last_failure)]
    answered = [json.loads(r[3])["actions"] for r in replies if r[2] == 200]
    return {
        "answers_correct": first["actions"] == expected_actions
        and all(actions == expected_actions for actions in answered),
        "replica_hosts": replica_hosts,
        "killed": replica_hosts[0],
        "replica_hosts_after": cluster.actors_by_host("Gateway"),
        "requests": len(replies),
        # The first answer of the run of 200s that lasts to the end.
        "replica_host_killed_back_s": round(back[0][1] - killed_at, 2) if back else None,
        "non_503_errors": sum(r[2] not in (200, 503) for r in replies),
        "errors_503": sum(r[2] == 503 for r in replies),
        "longest_wait_s": round(max(r[1] - r[0] for r in replies), 2),
    }


def listening(host) -> list[tuple[str, int, str]]:
    """(address, port, process) of each TCP socket listening on `host`."""
    done = host.run(["ss", "-ltnpH"], timeout=30)
    sockets = []
    for line in done.stdout.splitlines():
        fields = line.split()
        address, port = fields[3].rsplit(":", 1)
        process = re.search(r'"([^"]+)"', line)
        sockets.append((address.strip("[]"), int(port), process.group(1) if process else "?"))
    return sorted(set(sockets))


def exposure(cluster: HostCluster) -> dict:
    """What the laptop reaches on the head: every listening socket the head's
    processes hold (ss), whether a TCP connect from the laptop gets through, and for the
    dashboard and the GCS what a client gets with and without the token."""
    head, laptop = cluster.head, cluster.laptop
    ports = [
        {"address": address, "port": port, "process": process}
        for address, port, process in listening(head)
        if not address.startswith("127.")
    ]
    for entry in ports:
        entry["laptop_connects"] = laptop.connects(HEAD_ADDRESS, entry["port"], timeout=0.5)
    without = {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": ""}
    status = ["ray", "status", f"--address={cluster.gcs_address}"]
    version = [
        "python",
        "-c",
        "import sys, urllib.request, urllib.error\n"
        "try: print(urllib.request.urlopen(sys.argv[1], timeout=10).status)\n"
        "except urllib.error.HTTPError as e: print(e.code)\n",
        f"{cluster.dashboard_url}/api/jobs/",
    ]
    return {
        "listening": ports,
        "loopback_only": [
            {"address": a, "port": p, "process": proc}
            for a, p, proc in listening(head)
            if a.startswith("127.")
        ],
        "gcs_status_with_token": laptop.run(status, timeout=60).returncode == 0,
        "gcs_status_without_token": laptop.run(status, env=without, timeout=60).returncode == 0,
        "dashboard_jobs_http_status_without_token": laptop.run(version, timeout=30).stdout.strip(),
        "job_submit_refused_without_token": submit(
            cluster, ["python", "-c", "print(1)"], token=False
        ).returncode
        != 0,
    }
