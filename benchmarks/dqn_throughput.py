"""Experience throughput: rayline's collector actors against raw gymnasium vector-env
stepping with the same batched action selection, and the replay's add/sample rates.

    .venv/bin/python benchmarks/dqn_throughput.py [--env CartPole-v1] [--seconds 10]

Last stdout line: {"collect_vs_raw", "replay_add_per_s", "replay_sample_per_s", ...}.
Where a GPU is present it also reports learner updates/s on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from rayline.rl.collector import Collector, EnvSpec, describe_env, greedy_actions, make_vector_env
from rayline.rl.learner import Learner, LearnerSettings
from rayline.rl.networks import NetworkSpec, build_q_network
from rayline.rl.replay import ReplayBuffer, Transitions
from rayline.testing import init_local_ray

NUM_ENVS = 8
HIDDEN = [128, 128]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def raw_steps_per_s(env: EnvSpec, spec: NetworkSpec, seconds: float) -> float:
    """Plain vector-env stepping with a batched greedy forward pass per step."""
    venv = make_vector_env(env, NUM_ENVS)
    act = greedy_actions(build_q_network(spec).eval())  # the collectors' own action selection
    obs, _ = venv.reset(seed=0)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        obs, *_ = venv.step(act(obs))
        steps += NUM_ENVS
    return steps / (time.perf_counter() - started)


def collector_steps_per_s(
    env: EnvSpec, spec: NetworkSpec, num_collectors: int, seconds: float
) -> float:
    """Collector actors pushing n-step transitions into the replay actor, as in training."""
    import ray

    from rayline.rl.collector import CollectorActor
    from rayline.rl.replay import ReplayActor

    replay = ReplayActor.remote(
        capacity=200_000, obs_shape=tuple(spec.obs_shape), obs_dtype=np.float32
    )
    collectors = [
        CollectorActor.options(num_cpus=0.5).remote(
            env=env,
            network=spec,
            num_envs=NUM_ENVS,
            epsilons=[0.1] * NUM_ENVS,
            n_step=3,
            gamma=0.99,
            seed=i,
        )
        for i in range(num_collectors)
    ]
    ray.get([c.collect.remote(replay, 256, None, 0) for c in collectors])  # warm up
    steps, started = 0, time.perf_counter()
    in_flight = {c.collect.remote(replay, 1024, None, 0): c for c in collectors}
    while time.perf_counter() - started < seconds:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        collector = in_flight.pop(ready[0])
        steps += ray.get(ready[0])["env_steps"]
        in_flight[collector.collect.remote(replay, 1024, None, 0)] = collector
    elapsed = time.perf_counter() - started
    for ref in in_flight:
        ray.get(ref)
    for actor in [*collectors, replay]:
        ray.kill(actor)
    return steps / elapsed


def replay_rates(obs_shape: tuple[int, ...], seconds: float) -> tuple[float, float]:
    buffer = ReplayBuffer(100_000, obs_shape, np.float32, prioritized=True)
    chunk = 256
    batch = Transitions(
        np.random.randn(chunk, *obs_shape).astype(np.float32),
        np.random.randint(0, 2, chunk),
        np.random.randn(chunk).astype(np.float32),
        np.random.randn(chunk, *obs_shape).astype(np.float32),
        np.full(chunk, 0.99, np.float32),
    )
    added, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds / 2:
        buffer.add(batch)
        added += chunk
    add_rate = added / (time.perf_counter() - started)
    sampled, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds / 2:
        sample = buffer.sample(64)
        buffer.update_priorities(sample.indices, np.random.rand(64))
        sampled += 64
    return add_rate, sampled / (time.perf_counter() - started)


def learner_updates_per_s(spec: NetworkSpec, device: str, seconds: float) -> float:
    learner = Learner(spec, LearnerSettings(1e-3, 0.99, True, 500, 1.0, 10.0, device))
    buffer = ReplayBuffer(10_000, tuple(spec.obs_shape), np.float32)
    n = 10_000
    buffer.add(
        Transitions(
            np.random.randn(n, *spec.obs_shape).astype(np.float32),
            np.random.randint(0, spec.n_actions, n),
            np.random.randn(n).astype(np.float32),
            np.random.randn(n, *spec.obs_shape).astype(np.float32),
            np.full(n, 0.99, np.float32),
        )
    )
    batches = [buffer.sample(64) for _ in range(32)]
    for b in batches[:5]:
        learner.update(b)
    updates, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        learner.update(batches[updates % len(batches)])
        updates += 1
    return updates / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import ray

    env = EnvSpec(args.env)
    obs_shape, _, n_actions = describe_env(env)
    spec = NetworkSpec(list(obs_shape), n_actions, HIDDEN, True)

    log("raw vector-env stepping ...")
    raw = raw_steps_per_s(env, spec, args.seconds)
    log(f"  {raw:,.0f} steps/s")
    log("in-process Collector (no Ray) ...")
    plain = Collector(env, spec, num_envs=NUM_ENVS, epsilons=[0.1] * NUM_ENVS, n_step=3, gamma=0.99)
    started = time.perf_counter()
    plain_steps = 0
    while time.perf_counter() - started < args.seconds:
        plain_steps += plain.collect(1024)[1]["env_steps"]
    plain_rate = plain_steps / (time.perf_counter() - started)
    log(f"  {plain_rate:,.0f} steps/s")

    init_local_ray()
    rates = {}
    for count in (1, 2):
        log(f"{count} collector actor(s) -> replay actor ...")
        rates[count] = collector_steps_per_s(env, spec, count, args.seconds)
        log(f"  {rates[count]:,.0f} steps/s")
    ray.shutdown()

    log("replay add / sample ...")
    add_rate, sample_rate = replay_rates(obs_shape, args.seconds)
    log(f"  add {add_rate:,.0f}/s, sample+priority update {sample_rate:,.0f}/s")
    cpu_updates = learner_updates_per_s(spec, "cpu", args.seconds / 2)
    result = {
        "env": args.env,
        "num_envs_per_collector": NUM_ENVS,
        "raw_steps_per_s": round(raw),
        "collector_in_process_steps_per_s": round(plain_rate),
        "collect_1_steps_per_s": round(rates[1]),
        "collect_2_steps_per_s": round(rates[2]),
        "collect_vs_raw": round(rates[1] / raw, 3),
        "collect_2_vs_raw": round(rates[2] / raw, 3),
        "replay_add_per_s": round(add_rate),
        "replay_sample_per_s": round(sample_rate),
        "learner_updates_per_s_cpu": round(cpu_updates, 1),
    }
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
        result["learner_updates_per_s_gpu"] = round(
            learner_updates_per_s(spec, "cuda", args.seconds / 2), 1
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
