"""Ape-X at scale: where each part of rayline's distributed DQN saturates, from measured
single-component rates, and how well that model predicts runs this machine can do.

    .venv/bin/python benchmarks/dqn_scale.py [--seconds 4]

Measured, each part alone on this machine:
- collector env steps/s (one Collector, the pipeline's sub-envs, the Ape-X epsilon
  ladder, acting with its network), for CartPole-v1 and Pong (pixels: the Nature CNN,
  in float32 and in int8, `collectors.inference`), and the raw vector-env stepping of
  the same envs with random actions (the ceiling), measured in alternation;
- one replay shard's add rate (transitions/s, Pong frame batches as collectors send
  them) and sampled transitions/s through the learner's ShardedReplay client, with 1 and
  2 shards; bytes per stored Pong transition;
- learner updates/s (CPU; CUDA when present) at each pipeline's batch size, a fetch of
  `batches_per_fetch` batches at a time as the learner actor runs them, for each
  `learner.precision` x `learner.compile` setting (and the first fetch's seconds: the
  compile time);
- a weight broadcast: ray.put of the policy plus a get in another process;
- the driver's round trip per collector call (ray.wait over idle actors).

The model (all per second; E = env steps/s):
    E <= N x collector_rate                                   (collectors)
    E <= S / (t_add + ratio x batch x t_sample)                (S replay shards)
    E <= learner_updates_per_s / ratio                         (the learner, held to the
                                                                replay ratio)
    E <= steps_per_call / t_driver_call                        (the driver)
    E <= cores / (cpu seconds per env step of all the parts)   (one machine's cores)
with one core per collector and shard on a cluster (the last line dropped). It prints
the predicted E for 1..256 collectors and 1..8 shards, each part's saturation point,
then runs the CartPole pipeline with 1 and 2 collectors, 1 and 2 shards, locally and on
a three-node ray.cluster_utils cluster, and states predicted vs measured.

Progress goes to stderr; the last stdout line is one JSON object: {"collector_steps_per_s":
{"cartpole", "pong"}, "raw_env_steps_per_s": {...}, "collector_vs_raw": {...},
"replay": {"add_per_s", "sampled_per_s": {"1", "2"}, "two_shard_speedup",
"bytes_per_pong_transition", "frames_per_transition"}, "learner_updates_per_s":
{"cpu": {...}, "cuda": {...}|null} (as each pipeline is configured),
"learner_updates_per_s_by_setting": {device: {pipeline: {"float32"|"bfloat16"|
"float32_compiled"|"bfloat16_compiled": {"updates_per_s", "first_fetch_s"}}}}, "broadcast_s", "driver_call_s", "model":
{"saturation": {...}, "predicted_env_steps_per_s": {...}}, "checks": [{"setup",
"predicted", "measured", "error"}], "max_abs_error"}
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import tempfile
import time

import numpy as np
import ray
import torch

from common import cpu_seconds, emit, log
from rayline.pipelines import load_pipeline
from rayline.rl.apex import run_dqn
from rayline.rl.collector import Collector
from rayline.rl.config import NetworkSpec
from rayline.rl.envs import EnvSpec, make_vector_env
from rayline.rl.exploration import epsilon_ladder
from rayline.rl.learner import Learner
from rayline.rl.replay import ReplayActor, ReplayBuffer, ShardedReplay, Transitions
from rayline.testing import init_local_ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARTPOLE = os.path.join(REPO, "pipelines", "dqn-cartpole.yaml")
PONG = os.path.join(REPO, "pipelines", "dqn-pong.yaml")


def pipeline_config(path: str, **overrides):
    return load_pipeline(path, overrides)[1]


def specs(cfg) -> tuple[EnvSpec, NetworkSpec]:
    env = EnvSpec(cfg.env.id, cfg.env.atari, cfg.env.max_episode_steps)
    probe = make_vector_env(env, 1)
    obs_shape = list(probe.single_observation_space.shape)
    actions = int(probe.single_action_space.n)
    probe.close()
    return env, NetworkSpec(obs_shape, actions, cfg.network.hidden_sizes, cfg.network.dueling)


def collector_rate(cfg, seconds: float, inference: str) -> float:
    """Env steps/s of one collector (in this process, as its actor runs it)."""
    env, network = specs(cfg)
    num_envs = cfg.env.num_envs_per_collector
    ladder = [epsilon_ladder(i, num_envs, 0.4, 7.0) for i in range(num_envs)]
    collector = Collector(
        env,
        network,
        num_envs=num_envs,
        epsilons=ladder,
        n_step=3,
        gamma=0.99,
        inference=inference,
        seed=0,
    )
    collector.collect(cfg.collectors.env_steps_per_call)  # warm up
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        steps += collector.collect(cfg.collectors.env_steps_per_call)[1].env_steps
    return steps / (time.perf_counter() - started)


def raw_env_rate(cfg, seconds: float) -> float:
    env, _ = specs(cfg)
    num_envs = cfg.env.num_envs_per_collector
    venv = make_vector_env(env, num_envs)
    venv.reset(seed=0)
    rng = np.random.default_rng(0)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        venv.step(rng.integers(0, venv.single_action_space.n, num_envs))
        steps += num_envs
    venv.close()
    return steps / (time.perf_counter() - started)


def collection_rates(cfg, seconds: float, rounds: int = 3) -> dict:
    """The collector's env steps/s with each way of acting the pipeline allows, and raw
    stepping of the same vector env; measured in alternation (this machine's speed drifts
    by tens of percent over a minute), each the mean of `rounds` spells."""
    inferences = ["float32", "int8"] if cfg.env.atari else ["float32"]
    spells: dict = {name: [] for name in ["raw", *inferences]}
    for _ in range(rounds):
        spells["raw"].append(raw_env_rate(cfg, seconds / rounds))
        for inference in inferences:
            spells[inference].append(collector_rate(cfg, seconds / rounds, inference))
    return {name: sum(values) / len(values) for name, values in spells.items()}


def collected_batches(cfg, count: int) -> list:
    """Batches as the pipeline's collectors send them (random play, env_steps_per_call):
    Transitions for CartPole, FrameTransitions for Pong."""
    env, network = specs(cfg)
    collector = Collector(
        env,
        network,
        num_envs=cfg.env.num_envs_per_collector,
        epsilons=[1.0] * cfg.env.num_envs_per_collector,
        n_step=3,
        gamma=0.99,
    )
    return [collector.collect(cfg.collectors.env_steps_per_call)[0] for _ in range(count)]


def launch_shards(cfg, shards: int, capacity: int) -> list:
    _, network = specs(cfg)
    return [
        ReplayActor.options(scheduling_strategy="SPREAD", resources=cfg.replay.resources).remote(
            capacity=capacity,
            obs_shape=tuple(network.obs_shape),
            obs_dtype=_obs_dtype(cfg),
            prioritized=True,
            frames=cfg.env.atari,
            seed=shard,
        )
        for shard in range(shards)
    ]


def replay_rates(cfg, batches: list, shards: int, seconds: float) -> dict:
    """Add rate into one shard, then sampled transitions/s through the learner's
    ShardedReplay client with `shards` shards (each filled with the same batches), at
    the pipeline's batch size and batches per fetch; CPU seconds each shard and the
    client spent per sampled transition."""
    capacity = sum(len(b.actions) for b in batches) * 2
    actors = launch_shards(cfg, shards, capacity)
    pids = ray.get([actor.__ray_call__.remote(lambda self: os.getpid()) for actor in actors])
    refs = [ray.put(b) for b in batches]  # the add, not the driver's serialisation
    started = time.perf_counter()
    ray.get([actors[0].add.remote(ref) for ref in refs])
    add_per_s = sum(len(b.actions) for b in batches) / (time.perf_counter() - started)
    for actor in actors[1:]:
        ray.get([actor.add.remote(ref) for ref in refs])
    memory = ray.get(actors[0].memory.remote())
    client = ShardedReplay(actors, capacity, seed=0)
    per_fetch = cfg.learner.batches_per_fetch
    pending = client.request(per_fetch, cfg.learner.batch_size)
    shard_cpu = [cpu_seconds(pid) for pid in pids]
    client_cpu = time.process_time()
    sampled, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = client.collect(pending, beta=0.4)
        pending = client.request(per_fetch, cfg.learner.batch_size)
        ray.get(client.update_priorities(batch.indices, np.ones(batch.indices.shape)))
        sampled += batch.indices.size
    wall = time.perf_counter() - started
    shard_cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, shard_cpu)]
    client_cpu = time.process_time() - client_cpu
    for actor in actors:
        ray.kill(actor)
    return {
        "add_per_s": add_per_s,
        "sampled_per_s": sampled / wall,
        "shard_busy": [round(c / wall, 3) for c in shard_cpu],
        "client_busy": round(client_cpu / wall, 3),
        "shard_cpu_per_sampled": sum(shard_cpu) / sampled,
        "client_cpu_per_sampled": client_cpu / sampled,
        "memory": memory,
    }


LEARNER_SETTINGS = {  # name: (precision, compile)
    "float32": ("float32", False),
    "bfloat16": ("bfloat16", False),
    "float32_compiled": ("float32", True),
    "bfloat16_compiled": ("bfloat16", True),
}


def learner_rate(cfg, device: str, seconds: float, precision: str, compiled: bool) -> dict:
    """Updates/s of the learner's compute alone, as its actor runs it: a fetch of
    `batches_per_fetch` stacked batches moved to the device at once, one host sync per
    fetch. Also the seconds the first fetch took (compiling, when `compiled`)."""
    _, network = specs(cfg)
    batch_size, per_fetch = cfg.learner.batch_size, cfg.learner.batches_per_fetch
    buffer = ReplayBuffer(4 * batch_size, tuple(network.obs_shape), _obs_dtype(cfg), seed=0)
    rng = np.random.default_rng(0)
    shape = (4 * batch_size, *network.obs_shape)
    obs = (
        rng.integers(0, 256, shape, dtype=np.uint8)
        if cfg.env.atari
        else rng.normal(size=shape).astype(np.float32)
    )
    buffer.add(
        Transitions(
            obs,
            rng.integers(0, network.n_actions, len(obs)),
            rng.normal(size=len(obs)).astype(np.float32),
            obs[::-1].copy(),
            np.full(len(obs), 0.97, np.float32),
        )
    )
    settings = dataclasses.replace(
        cfg.learner,
        gamma=0.99,
        double_q=True,
        target_sync_every_updates=1000,
        tau=1.0,
        grad_clip_norm=10.0,
        device=device,
        precision=precision,
        compile=compiled,
    )
    learner = Learner(network, settings)
    batches = [buffer.sample(batch_size) for _ in range(per_fetch)]
    fetch = type(batches[0])(*(np.stack(field) for field in zip(*batches)))
    started = time.perf_counter()
    learner.update_stacked(fetch)  # warm up (and compile)
    first_fetch_s = time.perf_counter() - started
    updates, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or updates < 3:
        learner.update_stacked(fetch)  # ends in a host sync: the device work is done
        updates += per_fetch
    rate = updates / (time.perf_counter() - started)
    return {"updates_per_s": round(rate, 2), "first_fetch_s": round(first_fetch_s, 2)}


def learner_setting_name(cfg) -> str:
    return cfg.learner.precision + ("_compiled" if cfg.learner.compile else "")


def learner_actor_rate(cfg, batches: list, shards: int, seconds: float) -> float:
    """Updates/s of the pipeline's LearnerActor fed by `shards` filled shards: compute,
    sampling round trips, batch assembly and priority updates, as a run has them."""
    from rayline.rl.fleet import launch_learner

    capacity = sum(len(b.actions) for b in batches) * 2
    actors = launch_shards(cfg, shards, capacity)
    for actor in actors:
        ray.get([actor.add.remote(b) for b in batches])
    _, network = specs(cfg)
    cfg = copy.deepcopy(cfg)
    cfg.replay.shards, cfg.replay.capacity = shards, capacity * shards
    cfg.learner.num_gpus = 1 if torch.cuda.is_available() else 0  # dqn-pong.yaml asks for 1
    learner = launch_learner(cfg, network, actors)
    per_call = cfg.learner.batches_per_fetch
    ray.get(learner.train.remote(per_call)[0])  # warm up
    updates, started = 0, time.perf_counter()
    while time.perf_counter() - started < 2 * seconds:
        updates += ray.get(learner.train.remote(per_call)[0]).updates
    rate = updates / (time.perf_counter() - started)
    for actor in [learner, *actors]:
        ray.kill(actor)
    return rate


def _obs_dtype(cfg):
    return np.uint8 if cfg.env.atari else np.float32


@ray.remote(num_cpus=0)
class Sink:
    def fetch(self, weights: list) -> int:
        return len(ray.get(weights[0]))

    def ping(self) -> int:
        return 0


def broadcast_seconds(cfg) -> float:
    """ray.put of the policy's weights and their get in another process."""
    _, network = specs(cfg)
    from rayline.rl.networks import build_q_network

    weights = {k: v.numpy().copy() for k, v in build_q_network(network).state_dict().items()}
    sink = Sink.remote()
    ray.get(sink.ping.remote())
    times = []
    for _ in range(10):
        started = time.perf_counter()
        ray.get(sink.fetch.remote([ray.put(weights)]))
        times.append(time.perf_counter() - started)
    ray.kill(sink)
    return float(np.median(times))


def driver_call_seconds(count: int = 8, calls: int = 2000) -> float:
    """The driver's loop per call: launch on an idle actor, ray.wait for one, get it."""
    sinks = [Sink.remote() for _ in range(count)]
    ray.get([s.ping.remote() for s in sinks])
    in_flight = {s.ping.remote(): s for s in sinks}
    started = time.perf_counter()
    for _ in range(calls):
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        sink = in_flight.pop(ref)
        ray.get(ref)
        in_flight[sink.ping.remote()] = sink
    seconds = (time.perf_counter() - started) / calls
    for s in sinks:
        ray.kill(s)
    return seconds


def model_parts(cfg, collector_rate: float, one_shard: dict, learner_updates_per_s: float) -> dict:
    """What the model is made of, from the measured rates (`one_shard`: replay_rates with
    one shard); the driver's call time is added once measured (t_driver_call)."""
    return {
        "collector_rate": collector_rate,
        "t_add": 1.0 / one_shard["add_per_s"],
        "t_sample": one_shard["shard_cpu_per_sampled"],
        "ratio": cfg.learner.updates_per_env_step,
        "batch_size": cfg.learner.batch_size,
        "learner_updates_per_s": learner_updates_per_s,
        "steps_per_call": cfg.collectors.env_steps_per_call,
        "learning_starts": cfg.learner.learning_starts_env_steps,
    }


def part_limits(parts: dict, shards: int) -> dict:
    """The env steps/s each part other than the collectors allows, one core each."""
    return {
        "replay": shards / shard_seconds_per_step(parts),
        "learner": parts["learner_updates_per_s"] / parts["ratio"],
        "driver": parts["steps_per_call"] / parts["t_driver_call"],
    }


def shard_seconds_per_step(parts: dict) -> float:
    """A shard's CPU seconds per env step: the add, and the sampling the replay ratio
    asks for (ratio x batch sampled transitions per env step)."""
    return parts["t_add"] + parts["ratio"] * parts["batch_size"] * parts["t_sample"]


def predict(parts: dict, collectors: int, shards: int, cores: float | None) -> dict:
    """Env steps/s for `collectors` and `shards`, and which part sets it. `cores`: the
    machine's cores shared by all parts (None: a core for each collector and shard)."""
    limits = {"collectors": collectors * parts["collector_rate"], **part_limits(parts, shards)}
    if cores is not None:
        cpu_per_step = (
            1.0 / parts["collector_rate"]
            + shard_seconds_per_step(parts)
            + parts["ratio"] / parts["learner_updates_per_s"]
            + parts["t_driver_call"] / parts["steps_per_call"]
        )
        limits["cores"] = cores / cpu_per_step
    bound = min(limits, key=limits.get)
    return {"env_steps_per_s": limits[bound], "bound_by": bound}


def saturation(parts: dict, shards: int) -> dict:
    """Collectors at which each other part becomes the limit."""
    return {
        part: round(limit / parts["collector_rate"], 1)
        for part, limit in part_limits(parts, shards).items()
    }


def measured_run(cfg_overrides: dict, steps: int, workdir: str) -> float:
    """Env steps/s of a CartPole pipeline run, from its first env step to its end."""
    cfg = pipeline_config(
        CARTPOLE,
        **{
            "run.total_env_steps": steps,
            "run.max_wall_s": 600,
            "eval.every_env_steps": 10**9,
            "eval.episodes": 1,
            "eval.solved_return": None,
            "run.storage_path": os.path.join(workdir, "results"),
            "run.store_uri": os.path.join(workdir, "store"),
            "collectors.num_cpus": 0.25,
            "learner.num_cpus": 0.5,
            **cfg_overrides,
        },
    )
    final = run_dqn(cfg, lambda metrics, directory: None)
    # From the first step after learning starts, when the learner paces collection.
    return final["env_steps_sampled"] / (time.time() - final["first_env_step_unix_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--check-steps", type=int, default=12000)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each check")
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = {"cartpole": pipeline_config(CARTPOLE), "pong": pipeline_config(PONG)}
    cores = float(os.cpu_count() or 1)
    out: dict = {"cores": cores}

    log("collectors and raw envs ...")
    rates, raw, by_inference = {}, {}, {}
    for name, cfg in configs.items():
        measured = collection_rates(cfg, 3 * args.seconds)
        raw[name] = measured.pop("raw")
        rates[name] = measured[cfg.collectors.inference]  # as the pipeline runs
        by_inference[name] = {k: round(v, 1) for k, v in measured.items()}
        log(f"  {name}: collector {by_inference[name]}/s, raw env {raw[name]:,.0f}/s")
    out["collector_steps_per_s"] = {k: round(v, 1) for k, v in rates.items()}
    out["raw_env_steps_per_s"] = {k: round(v, 1) for k, v in raw.items()}
    out["collector_vs_raw"] = {k: round(rates[k] / raw[k], 3) for k in rates}
    out["collector_steps_per_s_by_inference"] = by_inference
    out["collector_vs_raw_by_inference"] = {
        name: {k: round(v / raw[name], 3) for k, v in measured.items()}
        for name, measured in by_inference.items()
    }
    out["envs_per_collector"] = {
        name: cfg.env.num_envs_per_collector for name, cfg in configs.items()
    }

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    log("learner compute ...")
    by_setting = {
        device: {
            name: {
                setting: learner_rate(cfg, device, args.seconds, *LEARNER_SETTINGS[setting])
                for setting in LEARNER_SETTINGS
            }
            for name, cfg in configs.items()
        }
        for device in devices
    }
    out["learner_updates_per_s_by_setting"] = by_setting
    # The learner as each pipeline configures it (precision, compile) feeds the model.
    out["learner_updates_per_s"] = {
        device: {
            name: by_setting[device][name][learner_setting_name(cfg)]["updates_per_s"]
            for name, cfg in configs.items()
        }
        for device in ("cpu", "cuda")
        if device in devices
    }
    if "cuda" in devices:
        out["cuda_device"] = torch.cuda.get_device_name()
    log(f"  {by_setting}")

    init_local_ray(num_cpus=int(cores))
    parts = {}
    try:
        out["replay"], out["learner_actor_updates_per_s"] = {}, {}
        for name, cfg in configs.items():
            log(f"{name}: replay shards and the learner actor ...")
            batches = collected_batches(cfg, 24)
            one = replay_rates(cfg, batches, 1, args.seconds)
            two = replay_rates(cfg, batches, 2, args.seconds)
            out["replay"][name] = {
                "add_per_s": round(one["add_per_s"], 1),
                "sampled_per_s": {
                    "1": round(one["sampled_per_s"], 1),
                    "2": round(two["sampled_per_s"], 1),
                },
                "two_shard_speedup": round(two["sampled_per_s"] / one["sampled_per_s"], 3),
                # A fetch waits for the shard's work and the client's; with a core each,
                # two shards halve the first.
                "two_shard_speedup_own_cores": round(
                    (one["shard_busy"][0] + one["client_busy"])
                    / (one["shard_busy"][0] / 2 + one["client_busy"]),
                    3,
                ),
                "busy": {
                    "1": {"shards": one["shard_busy"], "client": one["client_busy"]},
                    "2": {"shards": two["shard_busy"], "client": two["client_busy"]},
                },
                "bytes_per_transition": round(one["memory"]["bytes_per_transition"], 1),
            }
            if cfg.env.atari:
                out["replay"][name]["frames_per_transition"] = round(
                    one["memory"]["frames_per_transition"], 4
                )
                out["replay"][name]["bytes_per_transition_vs_frame"] = round(
                    one["memory"]["bytes_per_transition"] / (84 * 84), 4
                )
            out["learner_actor_updates_per_s"][name] = {
                str(shards): round(learner_actor_rate(cfg, batches, shards, args.seconds), 2)
                for shards in (1, 2)
            }
            log(f"  {out['replay'][name]}")
            log(f"  learner actor {out['learner_actor_updates_per_s'][name]}")
            parts[name] = model_parts(
                cfg, rates[name], one, out["learner_actor_updates_per_s"][name]["1"]
            )
        out["broadcast_s"] = {
            name: round(broadcast_seconds(cfg), 5) for name, cfg in configs.items()
        }
        out["driver_call_s"] = round(driver_call_seconds(), 6)
        log(f"  broadcast {out['broadcast_s']}, driver call {out['driver_call_s']}")
        for name in parts:
            parts[name]["t_driver_call"] = out["driver_call_s"]
        out["model"] = {name: scale_table(p) for name, p in parts.items()}

        log("checks: the CartPole pipeline, predicted vs measured ...")
        setups = [(1, 1), (2, 1), (2, 2)]
        measured: dict = {setup: [] for setup in setups}
        with tempfile.TemporaryDirectory() as workdir:
            for _ in range(args.repeats):  # interleaved: slow spells of the machine spread
                for collectors, shards in setups:
                    overrides = {"collectors.num_collectors": collectors, "replay.shards": shards}
                    rate = measured_run(overrides, args.check_steps, workdir)
                    measured[(collectors, shards)].append(rate)
                    log(f"  {collectors} collectors x {shards} shards: {rate:,.0f} env steps/s")
        checks = [
            check(
                f"local: {collectors} collectors x {shards} shards",
                with_shards(parts["cartpole"], out, "cartpole", shards),
                collectors,
                shards,
                cores,
                args.check_steps,
                measured[(collectors, shards)],
            )
            for collectors, shards in setups
        ]
    finally:
        ray.shutdown()
    from rayline.testing import local_cluster

    workers = [{"num_cpus": 1}, {"num_cpus": 1}]
    with local_cluster(1, workers), tempfile.TemporaryDirectory() as workdir:
        overrides = {"collectors.num_collectors": 2, "replay.shards": 2}
        cluster_runs = [
            measured_run(overrides, args.check_steps, workdir) for _ in range(args.repeats)
        ]
    setup = "3-node ray.cluster_utils: 2 collectors x 2 shards"
    cartpole = with_shards(parts["cartpole"], out, "cartpole", 2)
    checks.append(check(setup, cartpole, 2, 2, cores, args.check_steps, cluster_runs))
    log(f"  {checks[-1]}")
    out["checks"] = checks
    out["max_abs_error"] = max(abs(c["error"]) for c in checks)
    emit(out)


def with_shards(parts: dict, out: dict, name: str, shards: int) -> dict:
    """`parts` with the learner actor's rate measured against `shards` shards."""
    rate = out["learner_actor_updates_per_s"][name][str(shards)]
    return {**parts, "learner_updates_per_s": rate}


def scale_table(parts: dict) -> dict:
    """Predicted env steps/s for 1..256 collectors x 1..8 shards, one core each; the
    same without the learner's limit (what collection could feed a faster learner);
    and the collectors at which each other part saturates."""
    no_learner = {**parts, "learner_updates_per_s": float("inf")}
    grid = [(n, s) for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) for s in (1, 2, 4, 8)]
    return {
        "saturation_collectors": {f"{s}_shards": saturation(parts, s) for s in (1, 2, 4, 8)},
        "predicted_env_steps_per_s": {
            f"{n}x{s}": round(predict(parts, n, s, None)["env_steps_per_s"], 1) for n, s in grid
        },
        "predicted_without_learner_limit": {
            f"{n}x{s}": round(predict(no_learner, n, s, None)["env_steps_per_s"], 1)
            for n, s in grid
        },
        "bound_by": {f"{n}x{s}": predict(parts, n, s, None)["bound_by"] for n, s in grid},
    }


def check(
    setup: str,
    parts: dict,
    collectors: int,
    shards: int,
    cores: float,
    steps: int,
    runs: list[float],
) -> dict:
    """The model's mean env steps/s over a run of `steps`: collectors run free until
    learning starts, then at the steady rate, and the rate limiter lets each collector
    run one call ahead of the learner (rayline.rl.limiter.RateLimiter)."""
    steady = predict(parts, collectors, shards, cores)
    free = predict({**parts, "learner_updates_per_s": float("inf")}, collectors, shards, cores)
    ahead = parts["learning_starts"] + collectors * parts["steps_per_call"]
    seconds = (
        parts["learning_starts"] / free["env_steps_per_s"]
        + max(steps - ahead, 0) / steady["env_steps_per_s"]
    )
    predicted, measured = steps / seconds, float(np.mean(runs))
    return {
        "setup": setup,
        "predicted": round(predicted, 1),
        "bound_by": steady["bound_by"],
        "measured": round(measured, 1),
        "runs": [round(r, 1) for r in runs],
        "error": round(predicted / measured - 1, 3),
    }


if __name__ == "__main__":
    main()
