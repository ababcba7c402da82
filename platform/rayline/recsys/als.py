"""Matrix factorisation by alternating least squares, parallel on Ray.

Explicit ratings: r_ui ~ mu + b_u + b_i + p_u . q_i, each row solved as ridge regression
with weight lambda * n_u (ALS-WR, Zhou et al. 2008, https://doi.org/10.1007/978-3-540-68880-8_32).
Implicit feedback: Hu, Koren & Volinsky 2008 (http://yifanhu.net/PUB/cf.pdf): every
(user, item) has preference 1 if observed else 0, with confidence 1 + alpha * r_ui.

With `workers` > 0 each half-step splits the rows into that many blocks, solved as Ray
tasks that read the fixed side's factors from the object store: the same code runs on
a laptop and on a cluster, and every row's solve is independent of the split.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import scipy.sparse as sp

from rayline.recsys.base import Recommender, ray_map
from rayline.recsys.data import Ratings

logger = logging.getLogger(__name__)

BLOCK_FLOATS = 1 << 22
"""Padded rows x features held at once by a batched solve (32 MiB of float64): memory per
block is bounded whatever the number of rows."""


def solve_rows(
    matrix: sp.csr_matrix,
    fixed: np.ndarray,
    fixed_bias: np.ndarray,
    offset: float,
    regularization: float,
    implicit: bool,
    alpha: float,
) -> np.ndarray:
    """Solve every row of `matrix` exactly against the fixed side's factors.

    Explicit: returns (rows, f + 1) = [factors, bias], a ridge fit of r - offset - fixed_bias
    on the fixed side augmented with a constant 1 column (the bias), weight lambda * n_row.
    Implicit: returns (rows, f) solving (Y'Y + Y'(C - I)Y + lambda I) x = Y'C p.

    Rows are solved in batches of rows with similar counts: each batch's normal equations
    are built with one batched matrix product over rows padded to the batch's longest,
    and solved with one batched solve; no Python loop per row."""
    n_rows, f = matrix.shape[0], fixed.shape[1]
    if implicit:
        features_all, base = fixed, fixed.T @ fixed + regularization * np.eye(f)
    else:
        features_all, base = np.hstack([fixed, np.ones((len(fixed), 1))]), None
    d = features_all.shape[1]
    out = np.zeros((n_rows, d))
    for rows in count_batches(np.diff(matrix.indptr), BLOCK_FLOATS // d):
        out[rows] = _solve_batch(
            matrix, rows, features_all, fixed_bias, base, offset, regularization, implicit, alpha
        )
    return out  # a row with no ratings keeps zeros


def count_batches(counts: np.ndarray, padded_entries: int):
    """The rows with entries, in batches of similar counts whose padded size (rows x the
    batch's longest) stays under `padded_entries` (a row longer than that is a batch of
    its own): a batched solve wastes little on padding and its memory is bounded."""
    order = np.argsort(counts, kind="stable")
    order = order[counts[order] > 0]
    sorted_counts = counts[order]
    start = 0
    while start < len(order):
        # In count order a batch's last row is its longest, so m rows hold m * that count.
        window = sorted_counts[start : start + max(1, padded_entries // sorted_counts[start])]
        padded = np.arange(1, len(window) + 1) * window
        stop = start + max(1, int(np.searchsorted(padded, padded_entries, side="right")))
        yield order[start:stop]
        start = stop


BATCH_OVERHEAD_ENTRIES = 2048
"""A batch's fixed cost (its Python and numpy calls) in padded entries' worth of work."""


def split_batches(
    counts: np.ndarray, padded_entries: int, parts: int, row_work: int
) -> list[np.ndarray]:
    """`count_batches` in up to `parts` runs of whole batches with about the same work
    each: a batch's padded entries, plus `row_work` per row (a row's own d x d work in
    entries' worth) and BATCH_OVERHEAD_ENTRIES. A row meets the same batch, so gets the
    same answer to the last bit, whichever way the rows are split across workers."""
    batches = list(count_batches(counts, padded_entries))
    if not batches:
        return []
    work = np.cumsum(
        [len(rows) * (counts[rows[-1]] + row_work) + BATCH_OVERHEAD_ENTRIES for rows in batches]
    )
    cuts = np.searchsorted(work, np.linspace(0, work[-1], parts + 1)[1:-1], side="right")
    groups = np.split(np.arange(len(batches)), np.unique(cuts))
    return [np.concatenate([batches[i] for i in group]) for group in groups if len(group)]


def _gather(parts: list[np.ndarray], answers: list[np.ndarray], n_rows: int) -> np.ndarray:
    """Each part's answers back at its rows; a row in no part (no ratings) stays zero."""
    width = answers[0].shape[1] if answers else 0
    out = np.zeros((n_rows, width))
    for rows, answer in zip(parts, answers):
        out[rows] = answer
    return out


def _padded(matrix: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(columns, values, mask) of `rows`, each padded to the longest: (rows, longest)."""
    starts, counts = matrix.indptr[rows], np.diff(matrix.indptr)[rows]
    longest = int(counts.max())
    position = np.arange(longest)
    mask = position[None, :] < counts[:, None]
    gather = np.where(mask, starts[:, None] + position[None, :], 0)
    return matrix.indices[gather], np.where(mask, matrix.data[gather], 0.0), mask


def _solve_batch(
    matrix, rows, features_all, fixed_bias, base, offset, regularization, implicit, alpha
):
    columns, values, mask = _padded(matrix, rows)
    features = features_all[columns] * mask[..., None]  # (rows, longest, d), padding zero
    if implicit:
        confidence = (1.0 + alpha * values) * mask
        weighted = features * (confidence - mask)[..., None]  # (c - 1) y, zero on padding
        a = base + np.matmul(features.transpose(0, 2, 1), weighted)
        b = np.einsum("rnd,rn->rd", features, confidence)
    else:
        counts = mask.sum(axis=1)
        a = np.matmul(features.transpose(0, 2, 1), features)
        a += regularization * counts[:, None, None] * np.eye(features.shape[2])
        target = (values - offset - fixed_bias[columns]) * mask
        b = np.einsum("rnd,rn->rd", features, target)
    return np.linalg.solve(a, b[..., None])[..., 0]


CG_BLOCK_FLOATS = 1 << 20
"""Padded ratings x features (float32: 4 MiB) per conjugate-gradient batch: small enough
to stay in cache for all of its steps, and memory is bounded whatever the data."""


def cg_rows(
    matrix: sp.csr_matrix,
    fixed: np.ndarray,
    fixed_bias: np.ndarray,
    start: np.ndarray,
    offset: float,
    regularization: float,
    implicit: bool,
    alpha: float,
    steps: int,
) -> np.ndarray:
    """`steps` conjugate-gradient steps from `start` on every row's normal equations (the
    same ones `solve_rows` solves exactly), as the `implicit` library does for implicit
    feedback (Takacs, Pilaszy & Tikk 2011), vectorised over batches of rows with similar
    counts. Each row's system is A x = b with A = G + sum_i w_i y_i y_i' + ridge I and
    b = sum_i t_i y_i:
    implicit: G = Y'Y + lambda I (computed once), w = c - 1, t = c, ridge 0;
    explicit: G = 0, w = 1, t = r - offset - b_i, ridge = lambda n_row, y with a 1 appended.
    A batch gathers its rows' y once (rows x longest x d) and every step is two batched
    matrix-vector products over it: O(nnz f) a step, no f x f system per row."""
    if implicit:
        features = fixed
        gram = (fixed.T @ fixed + regularization * np.eye(fixed.shape[1])).astype(np.float32)
    else:
        features, gram = np.hstack([fixed, np.ones((len(fixed), 1))]), None
    d = features.shape[1]
    # float32 inside the steps: half the memory traffic, and a few CG steps from the last
    # solution do not need more precision (the final user half-step is exact). Padding
    # points at an appended zero row, so a padded position adds nothing.
    features = np.vstack([features, np.zeros((1, d))]).astype(np.float32)
    fixed_bias = np.asarray(fixed_bias, dtype=np.float64)
    counts = np.diff(matrix.indptr)
    out = np.zeros((matrix.shape[0], d))
    for rows in count_batches(counts, CG_BLOCK_FLOATS // d):
        columns, values, mask = _padded(matrix, rows)
        # np.take: about twice as fast as fancy indexing for this gather
        stacked = np.take(features, np.where(mask, columns, len(features) - 1), axis=0)
        if implicit:
            weights, targets, ridge = alpha * values, np.where(mask, 1.0 + alpha * values, 0), None
        else:
            weights = mask
            targets = np.where(mask, values - offset - fixed_bias[columns], 0.0)
            ridge = (regularization * counts[rows]).astype(np.float32)
        out[rows] = _cg_batch(
            stacked,
            weights.astype(np.float32),
            targets.astype(np.float32),
            gram,
            ridge,
            start[rows].astype(np.float32),
            steps,
        )
    return out  # a row with no ratings keeps zeros


def _cg_batch(stacked, weights, targets, gram, ridge, x, steps) -> np.ndarray:
    def times_a(p: np.ndarray) -> np.ndarray:
        dots = np.matmul(stacked, p[:, :, None])[..., 0]  # y_i . p for every entry
        product = np.matmul((weights * dots)[:, None, :], stacked)[:, 0, :]
        return product + (p @ gram if gram is not None else ridge[:, None] * p)

    residual = np.matmul(targets[:, None, :], stacked)[:, 0, :] - times_a(x)
    direction = residual.copy()
    norm = np.einsum("rd,rd->r", residual, residual)
    for _ in range(steps):
        product = times_a(direction)
        curvature = np.einsum("rd,rd->r", direction, product)
        step = np.divide(norm, curvature, out=np.zeros_like(norm), where=curvature > 0)
        x += step[:, None] * direction
        residual -= step[:, None] * product
        new_norm = np.einsum("rd,rd->r", residual, residual)
        ratio = np.divide(new_norm, norm, out=np.zeros_like(norm), where=norm > 0)
        direction = residual + ratio[:, None] * direction
        norm = new_norm
    return x


class ALS(Recommender):
    """Alternating least squares for explicit ratings (with biases) or implicit feedback."""

    kind = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        iterations: int = 15,
        implicit: bool = False,
        alpha: float = 10.0,
        workers: int = 0,
        seed: int = 0,
        cg_steps: int = 3,
    ):
        super().__init__()
        self.factors, self.regularization, self.iterations = factors, regularization, iterations
        self.implicit, self.alpha, self.workers, self.seed = implicit, alpha, workers, seed
        self.cg_steps = cg_steps
        self.iteration_seconds: list[float] = []
        """Wall seconds of each iteration of the last fit (not saved with the model)."""
        self._ray_parts: dict = {}
        self.user_factors = np.zeros((0, factors))
        self.item_factors = np.zeros((0, factors))
        self.user_bias = np.zeros(0)
        self.item_bias = np.zeros(0)

    def params(self) -> dict[str, Any]:
        return {
            "factors": self.factors,
            "regularization": self.regularization,
            "iterations": self.iterations,
            "implicit": self.implicit,
            "alpha": self.alpha,
            "workers": self.workers,
            "seed": self.seed,
            "cg_steps": self.cg_steps,
        }

    def _fit(self, train: Ratings) -> None:
        by_user = self.seen
        if self.implicit:
            by_user = by_user.copy()
            by_user.data = np.ones_like(by_user.data)  # any rating is an interaction
        by_item = by_user.T.tocsr()
        rng = np.random.default_rng(self.seed)
        self.item_factors = rng.normal(0, 0.01, (self.n_items, self.factors))
        self.item_bias = np.zeros(self.n_items)
        self.user_bias = np.zeros(self.n_users)
        offset = 0.0 if self.implicit else self.global_mean
        d = self.factors + (0 if self.implicit else 1)  # explicit: factors and a bias
        users = np.zeros((self.n_users, d))
        items = np.hstack([self.item_factors, self.item_bias[:, None]])[:, :d]
        self.iteration_seconds = []
        for iteration in range(self.iterations):
            started = time.perf_counter()
            if self.cg_steps:  # a few CG steps from the last solution
                users = self._cg(by_user, items, users, offset)
                self._unpack(users, "user")
                items = self._cg(by_item, self.user_factors, items, offset, side="user")
                self._unpack(items, "item")
            else:
                self._solve_users(by_user, offset)
                solved = self._solve(by_item, self.user_factors, self.user_bias, offset)
                self._unpack(solved, "item")
            self.iteration_seconds.append(time.perf_counter() - started)
            logger.info(
                "ALS iteration %d/%d: %.2f s",
                iteration + 1,
                self.iterations,
                self.iteration_seconds[-1],
            )
        # End on the user side, solved exactly, so folding a training user in (an exact
        # solve) reproduces their vector.
        self._solve_users(by_user, offset)
        self._ray_parts = {}  # the object store may let the ratings go

    def _solve_users(self, by_user: sp.csr_matrix, offset: float) -> None:
        self._unpack(self._solve(by_user, self.item_factors, self.item_bias, offset), "user")

    def _unpack(self, solved: np.ndarray, side: str) -> None:
        factors = solved[:, : self.factors]
        bias = np.zeros(len(solved)) if self.implicit else solved[:, self.factors]
        setattr(self, f"{side}_factors", factors)
        setattr(self, f"{side}_bias", bias)

    def _solve(
        self, matrix: sp.csr_matrix, fixed: np.ndarray, fixed_bias: np.ndarray, offset: float
    ) -> np.ndarray:
        settings = {
            "fixed": fixed,
            "fixed_bias": fixed_bias,
            "offset": offset,
            "regularization": self.regularization,
            "implicit": self.implicit,
            "alpha": self.alpha,
        }
        if self.workers <= 0:
            return solve_rows(matrix, **settings)
        d = fixed.shape[1] + (0 if self.implicit else 1)
        parts, blocks = self._parts(matrix, BLOCK_FLOATS // d)
        answers = ray_map(solve_rows, [{"matrix": block} for block in blocks], **settings)
        return _gather(parts, answers, matrix.shape[0])

    def _cg(
        self,
        matrix: sp.csr_matrix,
        fixed_solution: np.ndarray,
        start: np.ndarray,
        offset: float,
        side: str = "item",
    ) -> np.ndarray:
        """CG half-step against the other side's last solution ([factors, bias])."""
        settings = {
            "fixed": fixed_solution[:, : self.factors],
            "fixed_bias": getattr(self, f"{side}_bias"),
            "offset": offset,
            "regularization": self.regularization,
            "implicit": self.implicit,
            "alpha": self.alpha,
            "steps": self.cg_steps,
        }
        if self.workers <= 0:
            return cg_rows(matrix, start=start, **settings)
        d = self.factors + (0 if self.implicit else 1)
        parts, blocks = self._parts(matrix, CG_BLOCK_FLOATS // d)
        calls = [{"matrix": block, "start": start[rows]} for rows, block in zip(parts, blocks)]
        return _gather(parts, ray_map(cg_rows, calls, **settings), matrix.shape[0])

    def _parts(self, matrix: sp.csr_matrix, padded_entries: int) -> tuple[list, list]:
        """The rows of each worker's part and its ratings in the object store: split and
        put once per fit, not once per half-step (the ratings do not change)."""
        import ray

        key = (id(matrix), padded_entries)
        if key not in self._ray_parts:
            # Measured here on 20M ratings: a row's own work (its d x d products) weighs
            # about as much as d / 2 of its entries.
            d = self.factors + (0 if self.implicit else 1)
            parts = split_batches(np.diff(matrix.indptr), padded_entries, self.workers, d // 2)
            self._ray_parts[key] = (parts, [ray.put(matrix[rows]) for rows in parts])
        return self._ray_parts[key]

    def fold_in(self, items: np.ndarray, ratings: np.ndarray) -> tuple[np.ndarray, float]:
        """A user vector (and bias) for someone not in training, from their ratings,
        against the trained item factors; no retraining."""
        values = np.ones(len(items)) if self.implicit else np.asarray(ratings, dtype=np.float64)
        row = sp.csr_matrix(
            (values, (np.zeros(len(items), int), np.asarray(items))), shape=(1, self.n_items)
        )
        solved = solve_rows(
            row,
            self.item_factors,
            self.item_bias,
            0.0 if self.implicit else self.global_mean,
            self.regularization,
            self.implicit,
            self.alpha,
        )[0]
        return solved[: self.factors], 0.0 if self.implicit else float(solved[self.factors])

    def score_new_user(self, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        vector, bias = self.fold_in(items, ratings)
        scores = self.item_factors @ vector + self.item_bias
        return scores if self.implicit else scores + self.global_mean + bias

    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        scores = self.user_factors[users] @ self.item_factors.T + self.item_bias[None, :]
        if not self.implicit:
            scores += self.global_mean + self.user_bias[users, None]
        return scores

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        users, items = np.asarray(users), np.asarray(items)
        out = np.full(len(users), self.global_mean)
        known_user = (users >= 0) & (users < self.n_users)
        known_item = (items >= 0) & (items < self.n_items)
        if not self.implicit:
            out[known_user] += self.user_bias[users[known_user]]
            out[known_item] += self.item_bias[items[known_item]]
            both = known_user & known_item
            out[both] += np.einsum(
                "ij,ij->i", self.user_factors[users[both]], self.item_factors[items[both]]
            )
        return self.clip(out)

    def similar_items(self, item: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        norms = np.linalg.norm(self.item_factors, axis=1)
        sims = self.item_factors @ self.item_factors[item] / np.maximum(norms * norms[item], 1e-12)
        sims[item] = -np.inf
        top = np.argsort(-sims, kind="stable")[:k]
        return top, sims[top]

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "user_factors": self.user_factors,
            "item_factors": self.item_factors,
            "user_bias": self.user_bias,
            "item_bias": self.item_bias,
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            setattr(self, name, value)
