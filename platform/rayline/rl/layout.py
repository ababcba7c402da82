"""What a DQN run's configuration fixes before any actor starts: where each role is
placed in the trial's placement group (`Bundles`) and every role's seeds (`Seeds`).
One object each, so that the code that builds the group and the code that reads it,
or two roles' random streams, cannot drift apart."""

from __future__ import annotations

import dataclasses

from rayline.rl.config import DQNConfig

REGISTRATION_SEED = 7_000_000
"""Offset of the registration's re-evaluation seeds: far from the run's evaluations."""
COMPARE_SEED = 9_000_000
"""Seeds of `rayline models compare`: none a run or a registration plays."""


@dataclasses.dataclass(frozen=True)
class Bundles:
    """The trial's placement group, in order: a head bundle (the trial's run loop, the
    evaluator and a single replay shard, which needs `replay.resources` there; several
    shards are spread outside the group), the learner's, then one per collector. Tune
    drops an empty head bundle from the group it makes, so the learner's index is
    counted from the group's end."""

    head: dict
    learner: dict
    collector: dict
    collectors: int

    @classmethod
    def of(cls, cfg: DQNConfig) -> Bundles:
        return cls(
            head=_reserved(cfg.replay.resources if cfg.replay.shards == 1 else {}),
            learner=_reserved(
                {"CPU": cfg.learner.num_cpus, "GPU": cfg.learner.num_gpus, **cfg.learner.resources}
            ),
            collector=_reserved({"CPU": cfg.collectors.num_cpus, **cfg.collectors.resources}),
            collectors=cfg.collectors.num_collectors,
        )

    def bundles(self) -> list[dict]:
        """What `tune.PlacementGroupFactory` is given."""
        return [self.head, self.learner] + [self.collector] * self.collectors

    def index(self, group_size: int, role: str, collector: int = 0) -> int:
        """The bundle of `role` ("learner" or "collector" number `collector`) in a group
        of `group_size` bundles made from `bundles()`."""
        learner = group_size - 1 - self.collectors
        if role == "learner":
            return learner
        if not 0 <= collector < self.collectors:
            raise ValueError(f"collector {collector}: the group has {self.collectors}")
        return learner + 1 + collector


def _reserved(resources: dict) -> dict:
    """Only what is asked for: Tune refuses a bundle with zero amounts."""
    return {name: amount for name, amount in resources.items() if amount}


@dataclasses.dataclass(frozen=True)
class Seeds:
    """Every seed a run plays with, from `run.seed`: each collector's envs and acting
    noise, each replay shard's sampling, the learner's initialisation, the greedy
    evaluations, their confirmations, the final evaluation and the registration's."""

    seed: int

    def collector(self, index: int) -> int:
        return self.seed * 1000 + index

    def replay(self, shard: int) -> int:
        return self.seed * 1000 + shard

    def learner(self) -> int:
        return self.seed

    def evaluation(self, number: int) -> int:
        """The `number`th evaluation's first episode (episode i plays seed + i)."""
        return self.seed + 10_000 + number

    def confirmation(self, number: int) -> int:
        """The `number`th confirmation's: seeds no evaluation used."""
        return self.seed + 50_000 + 1_000 * number

    def final_evaluation(self) -> int:
        return self.seed + 99_999

    def registration(self) -> int:
        return self.seed + REGISTRATION_SEED
