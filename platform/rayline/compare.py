"""Champion and challenger: two versions of a model scored on the same evaluation, their
paired differences, and a bootstrap interval of the mean difference. Each family says
how its kind is evaluated (`Pipeline.compare`); this module does the statistics and the
gate that `rayline models promote --gate` applies."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rayline.config import ConfigError
from rayline.store import ModelRegistry

BOOTSTRAP_RESAMPLES = 4000


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Versions `a` and `b` on the same `n` samples (episodes, rows, images, users).
    `delta` is how much better b scored than a in the metric's direction (positive: b is
    better), `ci95` the bootstrap 95 % interval of it over the paired samples."""

    metric: str
    higher_is_better: bool
    a: dict
    b: dict
    delta: float
    ci95: tuple[float, float]
    n: int

    @property
    def better(self) -> str:
        if self.ci95[0] > 0:
            return "b"
        if self.ci95[1] < 0:
            return "a"
        return "neither"

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "ci95": list(self.ci95), "better": self.better}


def paired(
    metric: str,
    higher_is_better: bool,
    a: tuple[int, Sequence[float]],
    b: tuple[int, Sequence[float]],
    seed: int = 0,
) -> Comparison:
    """A comparison from per-sample scores of (version, scores) a and b, sample i of one
    paired with sample i of the other: the mean of the differences and a seeded bootstrap
    (resampling the pairs) of it."""
    scores_a, scores_b = np.asarray(a[1], np.float64), np.asarray(b[1], np.float64)
    if scores_a.shape != scores_b.shape or scores_a.ndim != 1 or len(scores_a) < 2:
        raise ValueError("paired scores: two equal-length lists of at least 2 samples")
    sign = 1.0 if higher_is_better else -1.0
    differences = sign * (scores_b - scores_a)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), (BOOTSTRAP_RESAMPLES, len(differences)))
    means = differences[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Comparison(
        metric,
        higher_is_better,
        {"version": a[0], "score": float(scores_a.mean())},
        {"version": b[0], "score": float(scores_b.mean())},
        float(differences.mean()),
        (float(low), float(high)),
        len(differences),
    )


def compare(registry: ModelRegistry, name: str, ref_a, ref_b, samples: int) -> Comparison:
    """Versions `ref_a` and `ref_b` (numbers or aliases) of model `name`, each scored by
    its family on the same evaluation. Versions of different kinds, or a kind whose
    family cannot compare, are refused (ConfigError: exit 2 on the command line)."""
    from rayline.family import pipeline_of_kind

    a, b = registry.get(name, ref_a), registry.get(name, ref_b)
    if a.kind != b.kind:
        raise ConfigError(
            f"{name} v{a.version} and v{b.version} cannot be compared: kinds {a.kind} and {b.kind}"
        )
    pipeline = pipeline_of_kind(a.kind)
    if pipeline is None or pipeline.compare is None:
        raise ConfigError(f"{name}: models of kind {a.kind!r} cannot be compared yet")
    return pipeline.compare(registry, a, b, samples)


@dataclasses.dataclass(frozen=True)
class Promotion:
    """What a gated promotion did: whether the alias moved, the comparison it rested on
    (None when there was no holder to compare with), and one line that says so."""

    promoted: bool
    comparison: Comparison | None
    message: str


def promote_gated(
    registry: ModelRegistry,
    name: str,
    ref,
    alias: str = "production",
    min_delta: float = 0.0,
    samples: int = 50,
) -> Promotion:
    """Move `alias` to version `ref` only if it beats the alias's holder on the same
    evaluation by `min_delta`, with the interval's lower bound above 0 (or if the alias
    has no holder). Either way the decision, with its figures, is in the history."""
    candidate = registry.get(name, ref)
    holder = registry.aliases(name).get(alias)
    if holder == candidate.version:
        return Promotion(True, None, f"{alias} already -> {name} v{holder}")
    if holder is None:
        registry.promote(name, candidate.version, alias)
        return Promotion(
            True, None, f"{alias} -> {name} v{candidate.version} (no holder to compare with)"
        )
    comparison = compare(registry, name, holder, candidate.version, samples)
    figures = comparison.as_json()
    low, high = comparison.ci95
    said = (
        f"v{candidate.version} {comparison.b['score']:.4g} vs v{holder} "
        f"{comparison.a['score']:.4g} ({comparison.metric}), delta {comparison.delta:.4g}, "
        f"95% interval [{low:.4g}, {high:.4g}] over {comparison.n}"
    )
    if not gate_passes(comparison, min_delta):
        registry.record(
            name,
            "promotion_refused",
            alias=alias,
            version=candidate.version,
            holder=holder,
            min_delta=min_delta,
            comparison=figures,
        )
        return Promotion(False, comparison, f"not promoted: {said}")
    registry.promote(name, candidate.version, alias, comparison=figures, min_delta=min_delta)
    return Promotion(True, comparison, f"{alias} -> {name} v{candidate.version}: {said}")


def gate_passes(comparison: Comparison, min_delta: float) -> bool:
    """Whether the challenger (b) is better by at least `min_delta`, with the interval's
    lower bound above 0."""
    return comparison.delta >= min_delta and comparison.ci95[0] > 0
