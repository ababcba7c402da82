"""Experience collection: gymnasium vector envs stepped with an epsilon-greedy copy of
the policy, turned into n-step transitions and pushed to the replay in batches.

The vector env resets finished sub-envs in the same step (gymnasium's SAME_STEP
autoreset) and hands the true last observation back in `info["final_obs"]`; that is
the observation a truncated episode bootstraps from.

Atari (Mnih et al. 2015, Machado et al. 2018): gymnasium's preprocessing (up to 30
no-op starts, frame skip 4 with max-pooling, 84x84 grey), sticky actions (ALE v5's
default), and 4 stacked frames. For training only, a lost life ends the episode (the
game goes on) and rewards are clipped to their sign; evaluation plays whole games with
the game's own score. A collector sends each frame once (`FrameTracker`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import ray

from rayline.rl.acting import acting_policy
from rayline.rl.config import NetworkSpec
from rayline.rl.envs import FRAME_STACK, EnvSpec, evaluate_greedy, make_vector_env
from rayline.rl.exploration import linear_schedule
from rayline.rl.replay import FrameTransitions, Transitions
from rayline.startup import HEALTH_GROUP, ActorStart, exit_quietly_on_sigterm


class NStepBuilder:
    """Turns per-step (obs, action, reward, done) of E parallel envs into n-step
    transitions, vectorised over envs: each env keeps a window of its last n steps."""

    def __init__(
        self, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype, n: int, gamma: float
    ):
        self.n = n
        self.obs = np.zeros((n, num_envs, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros((n, num_envs), dtype=np.int64)
        self.rewards = np.zeros((n, num_envs), dtype=np.float64)
        self.count = np.zeros(num_envs, dtype=np.int64)  # steps in the window, <= n
        self.slot = -1  # slot of the newest step
        self.powers = gamma ** np.arange(n + 1)
        # tails[j, k] = gamma^(k-j) for k >= j: row j sums the window's rewards from j on.
        exponents = np.arange(n)[None, :] - np.arange(n)[:, None]
        self.tails = np.where(exponents >= 0, gamma ** np.maximum(exponents, 0), 0.0)
        self.orders = [(slot + 1 + np.arange(n)) % n for slot in range(n)]

    def step(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> Transitions | None:
        """Record one vector step (obs -> next_obs; next_obs must be the true final
        observation for envs that just finished) and return the transitions it completes."""
        n = self.n
        self.slot = (self.slot + 1) % n
        self.obs[self.slot] = obs
        self.actions[self.slot] = actions
        self.rewards[self.slot] = rewards
        self.count += 1
        np.minimum(self.count, n, out=self.count)
        # Window position j (0 = oldest, n-1 = newest) lives in slot (slot + 1 + j) % n.
        order = self.orders[self.slot]
        if not (terminated.any() or truncated.any()):
            if self.count.min() < n:
                full = np.nonzero(self.count == n)[0]
                if len(full) == 0:
                    return None
            else:
                full = slice(None)
            # The common step: every env with a full window emits its oldest step.
            oldest = order[0]
            return Transitions(
                obs=self.obs[oldest, full].copy(),
                actions=self.actions[oldest, full].copy(),
                rewards=(self.powers[:n] @ self.rewards[order])[full].astype(np.float32),
                next_obs=next_obs[full].copy(),
                discounts=np.full(len(next_obs[full]), self.powers[n], dtype=np.float32),
            )
        return self._step_with_episode_ends(order, next_obs, terminated, terminated | truncated)

    def _step_with_episode_ends(self, order, next_obs, terminated, done) -> Transitions | None:
        n = self.n
        # returns[j] = sum_{k>=j} gamma^(k-j) r_k over the window's tail.
        returns = self.tails @ self.rewards[order]  # (n, E)
        positions = np.arange(n)[:, None]
        full_and_running = (positions == 0) & (self.count == n)[None, :] & ~done[None, :]
        finished = done[None, :] & (positions >= (n - self.count)[None, :])
        emit_j, emit_env = np.nonzero(full_and_running | finished)
        self.count[done] = 0
        if len(emit_j) == 0:
            return None
        slots = order[emit_j]
        discounts = np.where(terminated[emit_env], 0.0, self.powers[n - emit_j])
        return Transitions(
            obs=self.obs[slots, emit_env].copy(),
            actions=self.actions[slots, emit_env].copy(),
            rewards=returns[emit_j, emit_env].astype(np.float32),
            next_obs=next_obs[emit_env].copy(),
            discounts=discounts.astype(np.float32),
        )


class FrameTracker:
    """Names every frame a vector env of stacked frames shows, so transitions can carry
    frame numbers instead of stacks, and a batch each frame once.

    FrameStackObservation shifts one new frame in per step and starts each episode with
    its first frame repeated (padding "reset"), so no stack mixes two episodes: the
    numbers follow from that, without comparing pixels (tests check them against the
    env's own stacks)."""

    def __init__(self, obs: np.ndarray):
        self.frames: dict[int, np.ndarray] = {}
        self.next_number = 0
        self.stacks = np.stack([self._first_stack(frame) for frame in obs[:, -1]])

    def _new(self, frame: np.ndarray) -> int:
        number = self.next_number
        self.frames[number] = frame.copy()
        self.next_number += 1
        return number

    def _first_stack(self, frame: np.ndarray) -> np.ndarray:
        return np.full(FRAME_STACK, self._new(frame), dtype=np.int64)

    def step(self, obs: np.ndarray, done: np.ndarray, info: dict) -> np.ndarray:
        """Frame numbers of each env's true next observation (the final one for envs that
        just finished); the tracker moves on to `obs`, where finished envs restarted."""
        final = info.get("final_obs") if done.any() else None
        newest = [
            self._new(final[env][-1] if done[env] else obs[env, -1]) for env in range(len(obs))
        ]
        next_numbers = np.concatenate([self.stacks[:, 1:], np.array(newest)[:, None]], axis=1)
        self.stacks = next_numbers.copy()
        for env in np.nonzero(done)[0]:
            self.stacks[env] = self._first_stack(obs[env, -1])
        return next_numbers

    def pack(self, batch: Transitions, keep: np.ndarray) -> FrameTransitions:
        """`batch` (with frame numbers for obs) as self-contained FrameTransitions; then
        forget every frame but those still in `keep` or in the current stacks."""
        numbers = np.concatenate([batch.obs.reshape(-1), batch.next_obs.reshape(-1)])
        unique, inverse = np.unique(numbers, return_inverse=True)
        positions = inverse.astype(np.int32).reshape(2, *batch.obs.shape)
        packed = FrameTransitions(
            frames=np.stack([self.frames[number] for number in unique]),
            obs=positions[0],
            actions=batch.actions,
            rewards=batch.rewards,
            next_obs=positions[1],
            discounts=batch.discounts,
        )
        self.forget_all_but(keep)
        return packed

    def forget_all_but(self, keep: np.ndarray) -> None:
        kept = set(np.concatenate([keep.reshape(-1), self.stacks.reshape(-1)]).tolist())
        self.frames = {n: f for n, f in self.frames.items() if n in kept}


def true_next_obs(obs: np.ndarray, done: np.ndarray, info: dict) -> np.ndarray:
    """The observation each env reached: `final_obs` for envs that just finished."""
    if not done.any():
        return obs
    next_obs = obs.copy()
    final = info["final_obs"]
    for env_index in np.nonzero(done)[0]:
        next_obs[env_index] = final[env_index]
    return next_obs


class CollectStats(NamedTuple):
    """What one `Collector.collect` call did besides its transitions."""

    env_steps: int
    episode_returns: list[float]
    episode_lengths: list[int]


class Collected(NamedTuple):
    """A collector actor's answer to one call (`needs_weights`: it collected nothing and
    wants the current weights with its next call)."""

    incarnation: str
    needs_weights: bool = False
    env_steps: int = 0
    episode_returns: Sequence[float] = ()
    episode_lengths: Sequence[int] = ()
    transitions: int = 0
    replay_lost: bool = False
    """Its previous add found the replay gone (the run loop rebuilds it)."""
    collect_s: float = 0.0


class Collector:
    """Steps a vector env with an epsilon-greedy local policy copy; plain Python."""

    def __init__(
        self,
        env: EnvSpec,
        network: NetworkSpec,
        *,
        num_envs: int,
        epsilons: list[float],
        n_step: int,
        gamma: float,
        epsilon_decay_env_steps: int = 0,
        inference: str = "float32",
        seed: int = 0,
    ):
        self.env = make_vector_env(env, num_envs)
        self.final_epsilons = np.asarray(epsilons, dtype=np.float64)
        self.epsilon_decay_env_steps = epsilon_decay_env_steps
        self.rng = np.random.default_rng(seed)
        self.obs, _ = self.env.reset(seed=seed)
        self.policy = acting_policy(network, inference, seed, self.obs, exploring=True)
        # Atari: the n-step windows hold frame numbers, not stacks (FrameTracker).
        self.frames = FrameTracker(self.obs) if env.atari else None
        self.builder = NStepBuilder(
            num_envs,
            (FRAME_STACK,) if self.frames else tuple(network.obs_shape),
            np.int64 if self.frames else self.env.single_observation_space.dtype,
            n_step,
            gamma,
        )
        self.episode_return = np.zeros(num_envs)
        self.episode_length = np.zeros(num_envs, dtype=np.int64)
        self.env_steps = 0
        """Env steps that count for the exploration decay (the whole fleet's, when
        driven by the Ape-X run loop)."""

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Act with new policy weights from now on (quantized on the frames at hand when
        acting in int8)."""
        self.policy.load(weights, self.obs)

    def epsilons(self) -> np.ndarray:
        """Each env's rate: from 1.0 down to its ladder value over the decay period."""
        return linear_schedule(
            self.env_steps, 1.0, self.final_epsilons, self.epsilon_decay_env_steps
        )

    def collect(self, num_steps: int) -> tuple[Transitions | FrameTransitions | None, CollectStats]:
        """Step until `num_steps` env steps (over all envs) are taken; return the
        transitions completed and the episodes finished."""
        num_envs = self.env.num_envs
        iterations = -(-num_steps // num_envs)
        # Exploration draws for the whole call at once: two numpy calls instead of 2 per step.
        explore = self.rng.random((iterations, num_envs)) < self.epsilons()
        random_actions = self.rng.integers(
            0, self.env.single_action_space.n, (iterations, num_envs)
        )
        parts: list[Transitions] = []
        returns: list[float] = []
        lengths: list[int] = []
        for i in range(iterations):
            actions = random_actions[i]
            # The network runs only for the envs that act greedily this step: on pixels
            # its forward pass costs as much as the emulator's step.
            acting = ~explore[i]
            if acting.all():
                actions = self.policy.greedy(self.obs)
            elif acting.any():
                actions = actions.copy()
                actions[acting] = self.policy.greedy(self.obs[acting])
            obs, rewards, terminated, truncated, info = self.env.step(actions)
            done = terminated | truncated
            if self.frames is None:
                built = self.builder.step(
                    self.obs,
                    actions,
                    rewards,
                    true_next_obs(obs, done, info),
                    terminated,
                    truncated,
                )
            else:
                numbers = self.frames.stacks
                next_numbers = self.frames.step(obs, done, info)
                built = self.builder.step(
                    numbers, actions, rewards, next_numbers, terminated, truncated
                )
            if built is not None:
                parts.append(built)
            self.episode_return += rewards
            self.episode_length += 1
            if done.any():
                returns.extend(self.episode_return[done].tolist())
                lengths.extend(self.episode_length[done].tolist())
                self.episode_return[done] = 0
                self.episode_length[done] = 0
            self.obs = obs
        steps = iterations * num_envs
        self.env_steps += steps
        batch = Transitions(*(np.concatenate(f) for f in zip(*parts))) if parts else None
        if self.frames is not None:
            window = self.builder.obs  # numbers the next calls' transitions may still use
            batch = None if batch is None else self.frames.pack(batch, window)
            if batch is None:
                self.frames.forget_all_but(window)
        return batch, CollectStats(steps, returns, lengths)


# No task events: tens of calls a second filled the GCS's task table (docs/dqn.md, "Held for hours").
@ray.remote(
    max_restarts=-1,
    max_task_retries=-1,
    enable_task_events=False,
    concurrency_groups=HEALTH_GROUP,
)
class CollectorActor:
    """A Collector that pushes to the shared replay, keeping at most one add in flight.

    The replay's handle comes with each call, not to the constructor: an actor that Ray
    restarts is rebuilt from its constructor arguments, and a handle among them lives in
    the object store, where it can be lost (ray-project/ray#53727)."""

    def __init__(self, **collector_kwargs):
        self.start = ActorStart()
        exit_quietly_on_sigterm()
        self.collector = Collector(**collector_kwargs)
        self.pending_add: ray.ObjectRef | None = None
        self.has_weights = False
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"
        """Changes when Ray restarts the actor (a new process): the run loop counts it."""
        self.start.constructed()

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        """Answered while a call runs (rayline.startup.HEALTH_GROUP); no answer: hung."""
        return True

    def started(self) -> tuple[float, float, float]:
        return self.start.times()

    def collect(
        self,
        replay: ray.actor.ActorHandle,
        num_steps: int,
        weights: list | None,
        env_steps_sampled: int,
        untrained: bool = False,
    ) -> Collected:
        """Collect `num_steps` env steps into `replay`. `weights` is [ObjectRef] of fresh
        policy weights (in a list so Ray hands over the ref instead of resolving it early);
        `env_steps_sampled` is the fleet's total, which the exploration decay follows;
        `untrained`: nothing has been learned yet, act with this copy's own initial weights."""
        if weights:
            self.collector.load_weights(ray.get(weights[0]))
            self.has_weights = True
        elif not (self.has_weights or untrained):
            # Restarted by Ray (its process or node was lost) and handed a call meant for
            # the old process, which had the weights: never act with initial weights.
            return Collected(self.incarnation, needs_weights=True)
        started = time.perf_counter()
        self.collector.env_steps = env_steps_sampled
        batch, stats = self.collector.collect(num_steps)
        replay_lost = False
        if batch is not None:
            if self.pending_add is not None:
                try:
                    ray.get(self.pending_add)  # bound in-flight adds (ray-project/ray#26691)
                except ray.exceptions.RayError:  # the replay died: the run loop rebuilds it
                    replay_lost = True
            self.pending_add = replay.add.remote(batch)
        return Collected(
            self.incarnation,
            env_steps=stats.env_steps,
            episode_returns=stats.episode_returns,
            episode_lengths=stats.episode_lengths,
            transitions=0 if batch is None else len(batch.actions),
            replay_lost=replay_lost,
            collect_s=time.perf_counter() - started,
        )


# No task events: tens of calls a second filled the GCS's task table (docs/dqn.md, "Held for hours").
@ray.remote(
    num_cpus=0,
    max_restarts=-1,
    max_task_retries=-1,
    enable_task_events=False,
    concurrency_groups=HEALTH_GROUP,
)
class EvaluatorActor:
    """Runs the greedy policy for evaluation, apart from the collectors."""

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        """Answered while a call runs (rayline.startup.HEALTH_GROUP); no answer: hung."""
        return True

    def __init__(self, env: EnvSpec, network: NetworkSpec):
        self.start = ActorStart()
        exit_quietly_on_sigterm()
        self.env = env
        self.policy = acting_policy(network)
        self.start.constructed()

    def started(self) -> tuple[float, float, float]:
        return self.start.times()

    def evaluate(self, weights: list, episodes: int, seed: int) -> list[float]:
        self.policy.load(ray.get(weights[0]), np.empty(0))
        return evaluate_greedy(self.env, self.policy.greedy, episodes, seed)
