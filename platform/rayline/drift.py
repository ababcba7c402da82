"""Input and output drift: a reference profile stored at registration, and a window of
what a replica serves, compared by the population stability index (PSI).

A profile holds, per feature, the edges of its deciles on the reference data (training
rows) and the share of reference values in each bin (and the share missing), and the
same for the model's outputs: the share of each predicted class or action, or deciles of
a regression's values. PSI = sum over bins of (served - reference) * ln(served /
reference), shares clipped at 1e-4; under 0.1 is stable, over 0.25 a shift worth acting
on (the rule of thumb of credit scoring, where PSI comes from).
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any

import numpy as np

PROFILE_FILE = "profile.json"
DRIFTED_PSI = 0.25
MIN_DRIFT_ROWS = 200
"""Rows a window must hold before its PSI means anything. Sampling noise alone, on an
undrifted feature over 10 bins (a normal sample against its own reference, 4,000 draws
each): 1 row gives PSI 8.28 every time, 30 rows a mean of 0.54 and 67 % of windows over
0.25, 100 rows 0.8 % over, 200 rows a mean of 0.046, a 99.9th percentile of 0.15 and none
over 0.25. Below it a report says `insufficient_data` and nothing is called drifted."""
BINS = 10
FLOOR = 1e-4


def _edges(values: np.ndarray) -> list[float]:
    """The deciles. Where the top decile is the maximum (ties: a feature constant in
    training, every image 32 px wide), one edge more just above it, so that a value
    beyond the reference's maximum (a 48 px image) falls in a bin the reference left
    empty and not in the bin of the maximum. (Values below the minimum already do.)"""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return []
    quantiles = np.quantile(finite, np.linspace(0, 1, BINS + 1)[1:-1])
    edges = sorted(set(float(q) for q in quantiles))
    if edges[-1] >= finite.max():
        edges.append(float(np.nextafter(finite.max(), np.inf)))
    return edges


def _shares(values: np.ndarray, edges: list[float]) -> list[float]:
    """Shares per bin (len(edges) + 1 bins, then one for missing values)."""
    missing = ~np.isfinite(values)
    counts = np.bincount(
        np.searchsorted(np.asarray(edges), values[~missing], side="right"),
        minlength=len(edges) + 1,
    ).tolist()
    counts.append(int(missing.sum()))
    total = max(len(values), 1)
    return [c / total for c in counts]


def numeric_profile(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    edges = _edges(values)
    return {"edges": edges, "shares": _shares(values, edges)}


def class_profile(labels: np.ndarray, classes: list) -> dict:
    counts = collections.Counter(np.asarray(labels).tolist())
    total = max(len(labels), 1)
    return {"classes": list(classes), "shares": [counts.get(c, 0) / total for c in classes]}


def build_profile(
    features: np.ndarray, names: list[str], outputs: np.ndarray, output_classes: list | None
) -> dict:
    """The reference profile of a model's inputs (rows x features) and outputs (a class
    per row where `output_classes` is given, else a value per row)."""
    features = np.asarray(features, dtype=np.float64)
    return {
        "rows": int(features.shape[0]),
        "features": {name: numeric_profile(features[:, j]) for j, name in enumerate(names)},
        "outputs": class_profile(outputs, output_classes)
        if output_classes is not None
        else numeric_profile(outputs),
    }


def psi(reference: list[float], served: list[float]) -> float:
    e = np.clip(np.asarray(reference, dtype=np.float64), FLOOR, None)
    a = np.clip(np.asarray(served, dtype=np.float64), FLOOR, None)
    return float(np.sum((a - e) * np.log(a / e)))


def served_shares(profile: dict, values: np.ndarray) -> list[float]:
    if "classes" in profile:
        counts = collections.Counter(np.asarray(values).tolist())
        total = max(len(values), 1)
        return [counts.get(c, 0) / total for c in profile["classes"]]
    return _shares(np.asarray(values, dtype=np.float64), profile["edges"])


class DriftWindow:
    """The last `size` rows a replica served for one model version (features and
    outputs, in ring buffers), and their PSI against the version's profile."""

    def __init__(self, profile: dict, size: int = 1000, threshold: float = DRIFTED_PSI):
        self.profile, self.size, self.threshold = profile, size, threshold
        self.names = list(profile["features"])
        self.features = np.full((size, len(self.names)), np.nan)
        self.outputs = np.zeros(size, dtype=np.float64)
        self.seen = 0
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_rows = 0
        self.lock = threading.Lock()  # predictions run in several worker threads at once

    def add(self, features: np.ndarray, outputs: np.ndarray) -> None:
        """Rows just served (rows x features, one output per row); the newest `size` are
        kept. On the request path this keeps only a reference: the ring's numpy work
        (10-20 us a call) was a few per cent of a one-observation DQN answer. The rows
        join the ring when a report asks for them or once `size` of them wait, so what
        waits is bounded as the ring is."""
        with self.lock:
            self.pending.append((features, outputs))
            self.pending_rows += len(features)
            if self.pending_rows >= self.size:
                self._fold()

    def _fold(self) -> None:
        """The waiting rows into the ring (the lock held)."""
        if not self.pending:
            return
        features = np.concatenate([np.asarray(f, dtype=np.float64) for f, _ in self.pending])
        outputs = np.concatenate(
            [np.asarray(o, dtype=np.float64).reshape(-1) for _, o in self.pending]
        )
        self.pending, self.pending_rows = [], 0
        features, outputs = features[-self.size :], outputs[-self.size :]
        at = np.arange(self.seen, self.seen + len(features)) % self.size
        self.features[at] = features
        self.outputs[at] = outputs
        self.seen += len(features)

    def report(self, min_rows: int = MIN_DRIFT_ROWS) -> dict[str, Any]:
        """PSI per feature and of the outputs over the rows held, once there are at least
        `min_rows` of them (MIN_DRIFT_ROWS); before that only how many are held."""
        with self.lock:
            self._fold()
            held = min(self.seen, self.size)
            features, outputs = self.features[:held].copy(), self.outputs[:held].copy()
        if held < min_rows:
            return {
                "window": held,
                "insufficient_data": True,
                "min_window": min_rows,
                "features": {},
                "outputs_psi": None,
                "max_psi": None,
                "drifted": False,
            }
        reference = self.profile["features"]
        psis = {
            name: round(
                psi(reference[name]["shares"], served_shares(reference[name], features[:, j])), 4
            )
            if held
            else 0.0
            for j, name in enumerate(self.names)
        }
        out = self.profile["outputs"]
        outputs_psi = round(psi(out["shares"], served_shares(out, outputs)), 4) if held else 0.0
        max_psi = max([*psis.values(), outputs_psi], default=0.0)
        return {
            "window": held,
            "insufficient_data": False,
            "min_window": min_rows,
            "features": psis,
            "outputs_psi": outputs_psi,
            "max_psi": max_psi,
            "drifted": bool(held) and max_psi > self.threshold,
        }


def drift_window(files: dict[str, bytes]) -> DriftWindow | None:
    """A window over a version's stored profile, or None (registered before profiles
    were kept): what a replica serving it was asked and answered."""
    raw = files.get(PROFILE_FILE)
    return DriftWindow(json.loads(raw)) if raw else None
