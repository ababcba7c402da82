"""rayline on a cluster of hosts (tests/hosts.py): each Ray node in its own network
namespace with its own address and `ray start`, token auth on, a laptop namespace that
reaches only the head. Driven as a cluster user drives one (tests/host_scenarios.py):
`ray job submit` and `serve deploy` from the laptop, a host killed mid-run."""

import subprocess

import numpy as np
import pytest

import host_scenarios
import oracles
from hosts import HEAD_ADDRESS, host_cluster, namespaces_unavailable
from rayline.serving.settings import direct_ingress_env
from rayline.store import ModelRegistry
from test_serving import register_policy

UNAVAILABLE = namespaces_unavailable()
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no host cluster here: {UNAVAILABLE}"),
]


def collector_hosts(tmp_path):
    return host_scenarios.job_hosts(tmp_path / "hosts")


def assert_hosts_isolated(cluster) -> None:
    """The laptop reaches the head only, and only with the token where Ray checks one."""
    laptop, worker = cluster.laptop, cluster.workers[0]
    assert laptop.connects(HEAD_ADDRESS, 8265)  # the dashboard, published on the head
    assert not laptop.connects(worker.address, 6379, timeout=0.5)  # no route past the head
    assert worker.connects(HEAD_ADDRESS, 6379)
    exposed = host_scenarios.exposure(cluster)
    assert exposed["job_submit_refused_without_token"]
    assert exposed["gcs_status_with_token"] and not exposed["gcs_status_without_token"]
    assert exposed["dashboard_jobs_http_status_without_token"] == "401"
    assert cluster.head.pids() and worker.pids()


@pytest.mark.hosts_long
def test_a_job_from_the_laptop_trains_across_hosts_and_registers(tmp_path):
    """The learner on the head, collectors and replay shards on the worker hosts (custom
    resources, as docs/cluster.md says), the policy registered in a store every host
    reaches. The harness first: hosts isolated as a cluster's are, and nothing of them
    left after (one cluster for both: each start is half a minute on 2 cores)."""
    with collector_hosts(tmp_path) as cluster:
        assert_hosts_isolated(cluster)
        namespaces = [host.namespace for host in cluster.hosts.values()]
        head = cluster.head
        job = host_scenarios.train_job(cluster, tmp_path, budget=2000, kill_at=None)
    assert job["succeeded"], job["log_tail"]
    assert set(job["collector_hosts"]) <= {"worker1", "worker2"}, job
    placed = {k: job[k] for k in ("collector_hosts", "shard_hosts", "phases", "log_tail")}
    assert len(job["collector_hosts"]) == 2 and len(job["shard_hosts"]) == 2, placed
    assert job["finished_budget"] and job["registered"], job
    registered = ModelRegistry(str(tmp_path / "store")).get("dqn-cartpole")
    assert registered.kind == "dqn"
    assert not head.pids()  # every process the nodes started is gone
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not set(namespaces) & {line.split()[0] for line in listed.splitlines() if line}


@pytest.mark.hosts_long
def test_a_job_outlives_the_loss_of_a_host_of_a_collector_and_a_shard(tmp_path):
    """The worker host of a replay shard is killed mid-run: the run finishes its budget,
    the shard rebuilt from its snapshot on a host left, the policy registered."""
    with collector_hosts(tmp_path) as cluster:
        job = host_scenarios.train_job(cluster, tmp_path, budget=3000, kill_at=1200)
    assert job["succeeded"], job["log_tail"]
    # Killed at its point (within a report, 0.5 s of steps), however fast the run went.
    assert job["killed_mid_run"] and 1200 <= job["killed_at_env_steps"] < 3000, job
    assert job["continued"] and job["finished_budget"], job
    assert job["shard_rebuilt"] and job["replay_restarts"] >= 1, job
    assert job["shard_hosts"] == ["worker1", "worker2", "worker3"], job  # rebuilt on the spare
    assert job["registered"], job


@pytest.mark.hosts_long
def test_serve_on_the_hosts_answers_the_laptop_and_outlives_a_replica_host(tmp_path):
    """deploy/serve.yaml deployed from the laptop (`serve deploy` with the token): the
    front on the head, which schedules nothing (num-cpus 0, as in deploy/kuberay), the
    gateway's two replicas on the two worker hosts; the laptop's answers match an
    independent forward pass; one replica's host is killed under a client's load: the
    front keeps answering (within 15 s, nothing but 503 meanwhile) and Serve brings the
    gateway back to two replicas on the host left. (One replica alone, and how long its
    replacement takes: benchmarks/multihost.py.)"""
    registry = ModelRegistry(str(tmp_path / "store"))
    version = register_policy(registry, seed=3)
    registry.promote("cartpole", version.version)
    observations = [[0.1, -0.2, 0.03, 0.4], [-0.3, 0.2, 0.1, -0.05]]
    q = oracles.dqn_q_values(registry.read_files(version), observations)
    expected = np.argmax(q, axis=1).tolist()
    serving = {"num_cpus": 1}
    with host_cluster(
        tmp_path / "hosts", [serving, serving], head_cpus=0, env=direct_ingress_env(8000)
    ) as cluster:
        served = host_scenarios.serve_job(
            cluster, tmp_path / "store", "cartpole", observations, expected, replicas=2
        )
    assert served["answers_correct"], served
    assert served["replica_hosts"] == ["worker1", "worker2"], served
    assert served["non_503_errors"] == 0, served
    assert served["replica_host_killed_back_s"] is not None, served
    assert served["replica_host_killed_back_s"] <= 15, served
    left = "worker2" if served["killed"] == "worker1" else "worker1"
    assert served["replica_hosts_after"] == [left, left], served
