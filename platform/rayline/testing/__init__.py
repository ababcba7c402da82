"""Shared by tests and examples: a local Ray, toy environments with known answers, and
synthetic data makers.

`ChainMDP` is importable by gymnasium id `rayline.testing:RaylineChain-v0`, so Ray workers
build it by name like any registered env.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import gymnasium as gym
import numpy as np

LOCAL_RAY_CPUS = 2


def init_local_ray(num_cpus: int = LOCAL_RAY_CPUS, **kwargs) -> dict:
    """Start a private local Ray cluster and return its address info.

    `address="local"` always starts a new cluster (a bare init can join another one on
    the same machine); the dashboard is off for a faster start.
    """
    import ray

    from rayline.startup import ray_data_env

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    for name, value in ray_data_env(num_cpus).items():  # as `rayline` starts a local Ray
        os.environ.setdefault(name, value)
    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=kwargs.pop("log_to_driver", False),
        **kwargs,
    )
    return context.address_info


@contextlib.contextmanager
def local_ray(num_cpus: int = LOCAL_RAY_CPUS, **kwargs) -> Iterator[dict]:
    """`init_local_ray` for the duration of the block."""
    import ray

    address_info = init_local_ray(num_cpus, **kwargs)
    try:
        yield address_info
    finally:
        ray.shutdown()


@contextlib.contextmanager
def local_cluster(
    head_cpus: float,
    workers: list[dict],
    env_vars: dict[str, str] | None = None,
    head_resources: dict[str, float] | None = None,
) -> Iterator:
    """A real multi-node Ray on this machine (`ray.cluster_utils.Cluster`): a head node of
    `head_cpus` CPUs and one worker node per entry of `workers` (`add_node` arguments:
    num_cpus, resources), joined by this process (with `env_vars` in the runtime env, as
    a cluster's runtime env carries them)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(env_vars or {})  # this process imports Serve too
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "resources": head_resources or {},
            "include_dashboard": False,
        },
    )
    try:
        for worker in workers:
            cluster.add_node(**worker)
        ray.init(
            address=cluster.address,
            logging_level=logging.WARNING,
            log_to_driver=False,
            runtime_env={"env_vars": env_vars} if env_vars else None,
        )
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def serving_cluster(env_vars: dict[str, str], worker_resources: dict[str, float]):
    """A head node of one CPU and a worker node of one CPU with `worker_resources`."""
    return local_cluster(1, [{"num_cpus": 1, "resources": worker_resources}], env_vars)


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 itself (x86 AVX512-BF16 or AMX, ARM BF16).
    Without it (an AVX2-only x86) torch emulates bfloat16 kernels 30-100x slower than
    float32: a test then trains end to end in float32 and checks bfloat16 on one step."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


class ChainMDP(gym.Env):
    """A deterministic chain of `length` states; action 1 moves right, action 0 ends the
    episode at once with reward 0. Reaching the last state ends it with reward 1.

    With discount g the optimal values are closed-form: from state s (0-based),
    Q*(s, right) = g ** (length - 2 - s) and Q*(s, stop) = 0. See `chain_q_star`.
    """

    metadata: dict = {"render_modes": []}

    def __init__(self, length: int = 5):
        self.length = length
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(length,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.state = 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.length, dtype=np.float32)
        obs[self.state] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state = 0
        return self._obs(), {}

    def step(self, action: int):
        if action == 0:
            return self._obs(), 0.0, True, False, {}
        self.state += 1
        reached = self.state == self.length - 1
        return self._obs(), 1.0 if reached else 0.0, reached, False, {}


def chain_q_star(length: int, gamma: float) -> np.ndarray:
    """Q*[s, a] for the non-terminal states of `ChainMDP(length)`."""
    q = np.zeros((length - 1, 2))
    for s in range(length - 1):
        q[s, 1] = gamma ** (length - 2 - s)
    return q


gym.register("RaylineChain-v0", entry_point=ChainMDP, max_episode_steps=50)
CHAIN_ENV_ID = "rayline.testing:RaylineChain-v0"
"""Env id that imports this module first, so it resolves in any Ray worker."""
