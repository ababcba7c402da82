"""The environments, as data and as gymnasium vector envs: what the driver checks
before Ray starts and the collectors and evaluators step. No torch here: the driver of a
run imports this without paying for it.

The vector env resets finished sub-envs in the same step (gymnasium's SAME_STEP
autoreset) and hands the true last observation back in `info["final_obs"]`.
Atari: gymnasium's preprocessing (up to 30 no-op starts, frame skip 4 with max-pooling,
84x84 grey), sticky actions (ALE v5's default), 4 stacked frames; for training only, a
lost life ends the episode and rewards are clipped to their sign.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from rayline.rl.config import EnvConfig


@dataclass
class EnvSpec:
    """Which environment to build and how."""

    id: str
    atari: bool = False
    max_episode_steps: int | None = None
    package: str = ""
    """`module` or `module:register_function` (EnvConfig.package)."""

    @classmethod
    def of(cls, env: EnvConfig | dict) -> EnvSpec:
        """The spec of a run's `env` section (or of its stored dict, as registered)."""
        if isinstance(env, dict):
            env = EnvConfig(**{k: v for k, v in env.items() if k in EnvConfig.__dataclass_fields__})
        return cls(env.id, env.atari, env.max_episode_steps, env.package)


_LOADED_PACKAGES: set[str] = set()


def load_env_package(package: str) -> None:
    """Import `module` of `module:function` and call `function` (once per process), so
    the env ids it registers exist; ModuleNotFoundError or ValueError naming what is
    missing."""
    if not package or package in _LOADED_PACKAGES:
        return
    module_name, _, function = package.partition(":")
    module = importlib.import_module(module_name)
    if function:
        register = getattr(module, function, None)
        if not callable(register):
            raise ValueError(f"module {module_name} has no function {function!r}")
        register()
    _LOADED_PACKAGES.add(package)


FRAME_STACK = 4


class EpisodicLife(gym.Wrapper):
    """A lost life ends the training episode, but not the game: the next reset goes on
    from where the life was lost (one no-op step) unless the game is over."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.lives = 0
        self.game_over = True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        self.game_over = False
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


def make_vector_env(spec: EnvSpec, num_envs: int, training: bool = True) -> gym.vector.VectorEnv:
    """A synchronous vector env of `num_envs` copies, Atari-preprocessed when asked
    (`training` adds the life-loss episodes and clipped rewards learning uses)."""
    load_env_package(spec.package)
    kwargs = {"max_episode_steps": spec.max_episode_steps} if spec.max_episode_steps else {}
    if spec.atari:
        try:
            import ale_py
        except ImportError as exc:
            raise ImportError(
                f"env.id {spec.id!r} needs the Atari extra: pip install 'rayline[atari]'"
            ) from exc
        gym.register_envs(ale_py)

        def make_one() -> gym.Env:
            env = gym.make(spec.id, frameskip=1, **kwargs)
            env = gym.wrappers.AtariPreprocessing(env, frame_skip=4, screen_size=84, noop_max=30)
            if training:
                env = gym.wrappers.ClipReward(EpisodicLife(env), -1.0, 1.0)
            return gym.wrappers.FrameStackObservation(env, FRAME_STACK)

        return gym.vector.SyncVectorEnv(
            [make_one] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )
    return gym.make_vec(
        spec.id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
        **kwargs,
    )


def describe_env(spec: EnvSpec) -> tuple[tuple[int, ...], np.dtype, int]:
    """(observation shape, observation dtype, number of actions); discrete actions only."""
    env = make_vector_env(spec, 1)
    try:
        action_space = env.single_action_space
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(
                f"env.id {spec.id!r}: DQN needs a discrete action space, got {action_space}"
            )
        obs_space = env.single_observation_space
        return tuple(obs_space.shape), np.dtype(obs_space.dtype), int(action_space.n)
    finally:
        env.close()


def evaluate_greedy(
    env: EnvSpec, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int
) -> list[float]:
    """Returns of `episodes` episodes of policy `act` (a batch of observations -> a batch
    of actions), one episode per sub-env so short episodes are not over-counted."""
    returns: list[float] = []
    while len(returns) < episodes:
        batch = min(episodes - len(returns), 32)
        venv = make_vector_env(env, batch, training=False)
        obs, _ = venv.reset(seed=seed + len(returns))
        totals = np.zeros(batch)
        running = np.ones(batch, dtype=bool)
        while running.any():
            obs, rewards, terminated, truncated, _ = venv.step(act(obs))
            totals += rewards * running
            running &= ~(terminated | truncated)
        venv.close()
        returns.extend(totals.tolist())
    return returns
