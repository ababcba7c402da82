"""Collaborative filtering: data, metrics, kNN, ALS and the model contract."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from numerics import FLOAT64_RESHAPED, assert_same_ranking, assert_same_rankings
from rayline.config import DataError
from rayline.recsys import models
from rayline.recsys.als import ALS
from rayline.recsys.base import top_k
from rayline.recsys.data import (
    from_arrays,
    load_ratings,
    per_user_split,
    rating_split,
    synthetic_ratings,
)
from rayline.recsys.ease import EASE
from rayline.recsys.knn import UserKNN
from rayline.recsys.metrics import mae, ranking_metrics, rmse
from rayline.recsys.models import MODELS, MostPopular
from rayline.store import ModelRegistry

# -- data ------------------------------------------------------------------------------


def test_loaders_read_movielens_formats_and_custom_columns(tmp_path):
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n7,10,4.0,1\n7,20,3.5,2\n9,10,1,3\n"
    )
    data = load_ratings(str(tmp_path / "ml"))
    assert (data.n_users, data.n_items, len(data)) == (2, 2, 3)
    assert data.user_ids.tolist() == [7, 9] and data.item_ids.tolist() == [10, 20]
    assert data.users.tolist() == [0, 0, 1] and data.items.tolist() == [0, 1, 0]
    assert data.ratings.tolist() == [4.0, 3.5, 1.0]

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "u.data").write_text("1\t5\t3\t881250949\n2\t5\t4\t881250950\n")
    assert load_ratings(str(tmp_path / "old")).ratings.tolist() == [3.0, 4.0]

    table = pa.table({"who": ["a", "b"], "what": ["x", "x"], "stars": [5, 2]})
    pq.write_table(table, tmp_path / "r.parquet")
    data = load_ratings(f"file://{tmp_path}/r.parquet", columns=("who", "what", "stars"))
    assert data.user_ids.tolist() == ["a", "b"] and data.ratings.tolist() == [5.0, 2.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("userId,movieId\n1,2\n", "missing column 'rating'"),
        ("userId,movieId,rating\n1,2,good\n", "column 'rating' is not numeric"),
        ("", "the file is empty"),
        ("userId,movieId,rating\n", "no ratings"),
        ("userId,movieId,rating\n1,2,4\n1,2,5\n", "duplicate rating for user 1, item 2"),
        ("userId,movieId,rating\n1,2,inf\n", "ratings must be finite"),
        ("userId,movieId,rating\n1,2,\n", "has 1 empty values"),
    ],
)
def test_bad_data_is_named(tmp_path, text, message):
    path = tmp_path / "ratings.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_ratings(str(path))


def test_missing_path_and_directory_without_ratings(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_ratings(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="no ratings.csv, u.data"):
        load_ratings(str(tmp_path))


def test_protocol_splits():
    data, _ = synthetic_ratings(50, 40, seed=1)
    train, test = rating_split(data)
    assert len(test) == round(0.2 * len(data)) and len(train) + len(test) == len(data)
    train, test = per_user_split(data, 0.75, seed=42)
    counts = np.bincount(data.users)
    assert np.array_equal(
        np.bincount(train.users, minlength=data.n_users), np.round(0.75 * counts).astype(int)
    )
    pairs = set(zip(train.users.tolist(), train.items.tolist()))
    assert not pairs & set(zip(test.users.tolist(), test.items.tolist()))


# -- metrics ---------------------------------------------------------------------------


def test_ranking_metrics_on_hand_made_rankings():
    recommended = [
        np.arange(1, 11),
        np.arange(20, 30),
        np.array([1, 2, 40, 41, 42, 43, 44, 45, 46, 47]),
    ]
    relevant = [{1, 3, 11}, set(), {40}]
    got = ranking_metrics(recommended, relevant, k=10, n_candidates=100)
    # user 0: hits at ranks 1 and 3 of 3 relevant; user 2: hit at rank 3 of 1 relevant; user 1 skipped
    ndcg0 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3) + 1 / np.log2(4))
    ndcg2 = (1 / np.log2(4)) / 1.0
    assert got["precision@10"] == pytest.approx((0.2 + 0.1) / 2)
    assert got["recall@10"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert got["ndcg@10"] == pytest.approx((ndcg0 + ndcg2) / 2)
    assert got["map@10"] == pytest.approx(((1 + 2 / 3) / 3 + (1 / 3) / 1) / 2)
    assert got["coverage"] == pytest.approx(
        len(set(range(1, 11)) | set(range(20, 30)) | {40, 41, 42, 43, 44, 45, 46, 47}) / 100
    )


def test_rating_metrics():
    assert rmse(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(np.sqrt(2.5))
    assert mae(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(1.5)


# -- user kNN on a hand-computed toy -----------------------------------------------------

TOY = np.array(
    [
        [5, 3, 0, 1],
        [4, 0, 0, 1],
        [1, 1, 0, 5],
        [0, 1, 5, 4],
    ],
    dtype=np.float32,
)


def toy_ratings():
    users, items = np.nonzero(TOY)
    return from_arrays(users, items, TOY[users, items])


@pytest.mark.blas
def test_user_knn_cosine_similarities_predictions_and_ranking():
    model = UserKNN(similarity="cosine", k=2, shrinkage=0).fit(toy_ratings())
    sims = model.similarities(1)
    assert sims[0] == pytest.approx(21 / np.sqrt(35 * 17))  # (5*4 + 1*1) / (|u0| |u1|)
    assert sims[2] == pytest.approx(9 / np.sqrt(17 * 27))
    assert sims[3] == pytest.approx(4 / np.sqrt(17 * 42))
    # u1, item 1: the two most similar raters are u0 (rated 3) and u2 (rated 1)
    s0, s2 = 21 / np.sqrt(35 * 17), 9 / np.sqrt(17 * 27)
    assert model.predict(np.array([1]), np.array([1]))[0] == pytest.approx(
        (s0 * 3 + s2 * 1) / (s0 + s2)
    )
    items, scores = model.recommend(np.array([1]), k=2)
    assert items[0].tolist() == [1, 2] and scores[0][0] == pytest.approx(s0 * 3 + s2 * 1)
    assert model.explain(1, [1, 2]) == [
        [
            {"user": 0, "similarity": pytest.approx(s0), "rating": 3.0},
            {"user": 2, "similarity": pytest.approx(s2), "rating": 1.0},
        ],
        [],  # neither neighbour rated item 2
    ]


@pytest.mark.blas
def test_user_knn_pearson_on_mean_centred_ratings():
    model = UserKNN(similarity="pearson", k=2, shrinkage=0).fit(toy_ratings())
    sims = model.similarities(1)
    # centred: u0 = [2, 0, _, -2], u1 = [1.5, _, _, -1.5], u2 = [-4/3, -4/3, _, 8/3]
    assert sims[0] == pytest.approx(1.0)
    assert sims[2] == pytest.approx((1.5 * -4 / 3 - 1.5 * 8 / 3) / np.sqrt(4.5 * 96 / 9))
    # only u0 (positive similarity) counts; it rated item 1 at its own mean: u1's mean 2.5
    assert model.predict(np.array([1]), np.array([1]))[0] == pytest.approx(2.5)
    # unknown user -> global mean; no positive neighbour rated it -> the user's mean
    assert model.predict(np.array([-1]), np.array([0]))[0] == pytest.approx(TOY[TOY > 0].mean())


def test_shrinkage_and_min_overlap():
    shrunk = UserKNN(similarity="cosine", k=2, shrinkage=2).fit(toy_ratings())
    plain = UserKNN(similarity="cosine", k=2, shrinkage=0).fit(toy_ratings())
    # u0 and u1 co-rated 2 items: shrunk by 2 / (2 + 2)
    assert shrunk.similarities(1)[0] == pytest.approx(plain.similarities(1)[0] * 0.5)
    strict = UserKNN(similarity="cosine", k=2, shrinkage=0, min_overlap=3).fit(toy_ratings())
    assert strict.similarities(1)[0] == 0.0


# -- ALS -------------------------------------------------------------------------------


@pytest.mark.blas
def test_als_recovers_a_low_rank_matrix():
    data, truth = synthetic_ratings(200, 150, rank=4, density=0.3, noise=0.05, seed=3)
    train, test = rating_split(data)
    model = ALS(factors=8, regularization=0.01, iterations=15, seed=0).fit(train)
    held_out = rmse(test.ratings, model.predict(test.users, test.items))
    baseline = rmse(test.ratings, np.full(len(test), train.ratings.mean()))
    assert held_out < 0.15 and held_out < 0.3 * baseline, (held_out, baseline)


@pytest.mark.blas
def test_als_same_factors_in_one_process_and_on_1_2_3_ray_workers(ray_session):
    data, _ = synthetic_ratings(90, 60, rank=3, seed=4)
    for implicit in (False, True):
        one = ALS(factors=6, iterations=4, implicit=implicit, workers=0).fit(data)
        for workers in (1, 2, 3):  # each row in the same batch whatever the split: exact
            split = ALS(factors=6, iterations=4, implicit=implicit, workers=workers).fit(data)
            assert np.array_equal(one.user_factors, split.user_factors), (implicit, workers)
            assert np.array_equal(one.item_factors, split.item_factors), (implicit, workers)


@pytest.mark.blas
def test_fold_in_reproduces_a_training_users_vector():
    data, _ = synthetic_ratings(80, 60, rank=3, seed=5)
    for implicit in (False, True):
        model = ALS(factors=6, iterations=8, implicit=implicit, regularization=0.05).fit(data)
        user = 7
        rows = data.users == user
        vector, bias = model.fold_in(data.items[rows], data.ratings[rows])
        # one row's solve against the batch's: the same float64 normal equations through
        # another shape, so ulps apart; 1e-8 is far under what a wrong solve is off by
        assert np.allclose(vector, model.user_factors[user], atol=1e-8)
        assert bias == pytest.approx(model.user_bias[user], abs=1e-8)


@pytest.mark.blas
def test_fold_in_of_a_new_user_favours_what_is_like_their_items():
    # Two tastes: users 0-39 use items 0-29, users 40-79 items 30-59.
    rng = np.random.default_rng(0)
    users, items = [], []
    for user in range(80):
        group = range(0, 30) if user < 40 else range(30, 60)
        for item in rng.choice(list(group), 12, replace=False):
            users.append(user)
            items.append(item)
    data = from_arrays(np.array(users), np.array(items), np.ones(len(users)))
    model = ALS(factors=4, iterations=10, implicit=True, regularization=0.1, alpha=5).fit(data)
    scores = model.score_new_user(np.array([1, 2, 3, 4, 5]), np.ones(5))
    scores[[1, 2, 3, 4, 5]] = -np.inf
    assert set(np.argsort(-scores)[:10].tolist()) <= set(range(30))


# -- the contract every model passes ----------------------------------------------------

CONTRACT_MODELS = {
    "popular": lambda: MostPopular(),
    "user_knn": lambda: UserKNN(k=10),
    "als": lambda: ALS(factors=4, iterations=3),
    "als_implicit": lambda: ALS(factors=4, iterations=3, implicit=True),
    "ease": lambda: EASE(regularization=10.0),
}


@pytest.mark.blas
@pytest.mark.parametrize("name", sorted(CONTRACT_MODELS))
def test_recommender_contract(name, tmp_path):
    assert {m().kind for m in CONTRACT_MODELS.values()} == set(MODELS)
    data, _ = synthetic_ratings(40, 30, seed=6)
    model = CONTRACT_MODELS[name]().fit(data)
    users = np.array([0, 5, 9])
    scores = model.score(users)
    assert scores.shape == (3, data.n_items) and np.all(np.isfinite(scores))

    items, item_scores = model.recommend(users, k=5)
    assert items.shape == (3, 5)
    for row, user in enumerate(users):
        seen = set(data.items[data.users == user].tolist())
        assert not seen & set(items[row].tolist()) and len(set(items[row].tolist())) == 5
        assert np.all(np.diff(item_scores[row]) <= 0)

    predicted = model.predict(np.array([0, 1, -1]), np.array([0, 2, 3]))
    assert predicted.shape == (3,) and np.all((predicted >= 0.5) & (predicted <= 5.0))

    fresh = model.score_new_user(np.array([0, 1, 2]), np.array([5.0, 4.0, 1.0]))
    assert fresh.shape == (data.n_items,) and np.all(np.isfinite(fresh))

    similar, sims = model.similar_items(3, k=4)
    assert 3 not in similar.tolist() and len(similar) == 4 and np.all(np.diff(sims) <= 1e-12)

    registry = ModelRegistry(str(tmp_path))
    version = registry.register("rec", model.save(), kind="recommender")
    files = registry.read_files(version)
    loaded = models.load(files)
    assert type(loaded) is type(model) and loaded.params() == model.params()
    assert np.allclose(loaded.score(users), scores)
    assert np.allclose(loaded.predict(np.array([0, 1, -1]), np.array([0, 2, 3])), predicted)
    assert np.array_equal(loaded.recommend(users, k=5)[0], items)


# -- the pipeline end to end --------------------------------------------------------------


@pytest.mark.slow
def knn_sweep_config(tmp_path, **run):
    """A sweep of user kNN's k (2 and 20) on 60 users' ratings in a CSV under `tmp_path`,
    run.name "rec", with `run`'s other keys."""
    from rayline.config import from_dict
    from rayline.recsys.pipeline import RecommenderConfig

    data, _ = synthetic_ratings(60, 40, seed=8)
    lines = ["userId,movieId,rating"] + [
        f"u{data.user_ids[u]},i{data.item_ids[i]},{r:.2f}"
        for u, i, r in zip(data.users, data.items, data.ratings)
    ]
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    return from_dict(
        RecommenderConfig,
        {
            "pipeline": "recommender",
            "data": {"path": str(tmp_path / "ratings.csv")},
            "model": "user_knn",
            "run": {
                "name": "rec",
                "storage_path": str(tmp_path / "results"),
                "store_uri": str(tmp_path / "store"),
                **run,
            },
            "sweep": {"num_samples": 1, "params": {"user_knn.k": {"grid": [2, 20]}}},
        },
    )


def test_recommender_sweep_registers_the_best_model(ray_session, tmp_path):
    from rayline import pipelines

    cfg = knn_sweep_config(tmp_path)
    outcome = pipelines.run(pipelines.get_pipeline("recommender"), cfg, sweep=True)
    best, version = outcome.best, outcome.version
    assert best.config["user_knn"]["k"] in (2, 20)
    assert version.metrics["valid_ndcg@10"] == best.metrics["valid_ndcg@10"]
    assert 0 <= version.metrics["test_ndcg@10"] <= 1 and version.metrics["test_rmse"] > 0
    registry = ModelRegistry(str(tmp_path / "store"))
    model = models.load(registry.read_files(version))
    assert model.params()["k"] == best.config["user_knn"]["k"]
    assert model.user_ids[0].startswith("u")  # original ids kept for serving
    items, _ = model.recommend(np.array([0]), k=5)
    assert len(items[0]) == 5
    # Exported to Parquet, the pipeline's model gives the served top 5 by its README.
    from test_export import assert_recommender_parity, export

    assert export(registry, "rec", "1", str(tmp_path / "parquet")) == 0
    assert_recommender_parity(registry, "rec", 1, tmp_path / "parquet", "user_knn")


@pytest.mark.blas
def test_ease_closed_form_on_a_toy():
    # 3 users x 3 items; B = -P / diag(P) with P = (X'X + lambda I)^-1, zero diagonal
    users, items = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 2, 0])
    data = from_arrays(users, items, np.ones(5))
    model = EASE(regularization=1.0).fit(data)
    x = np.zeros((3, 3))
    x[users, items] = 1
    p = np.linalg.inv(x.T @ x + np.eye(3))
    expected = -p / np.diag(p)
    np.fill_diagonal(expected, 0)
    # EASE solves in float32 (the served dtype): ~1e-7 relative rounding on values near 1
    assert np.allclose(model.weights, expected, atol=1e-6)
    assert np.allclose(model.score(np.array([2])), x[[2]] @ expected, atol=1e-6)


@pytest.mark.blas
def test_knn_new_user_who_rates_like_a_training_user():
    model = UserKNN(similarity="cosine", k=2, shrinkage=0, power=1).fit(toy_ratings())
    # someone with u1's ratings: nearest are u1 itself (similarity 1) and u0
    items = np.nonzero(TOY[1])[0]
    fresh = model.score_new_user(items, TOY[1, items])
    expected = 1.0 * TOY[1] + 21 / np.sqrt(35 * 17) * TOY[0]
    assert np.allclose(fresh, expected, atol=1e-5)


def test_make_ratings_is_skewed_seeded_unique_and_learnable(tmp_path):
    from rayline.recsys.data import make_ratings

    path = make_ratings(str(tmp_path / "a"), 400, 300, 12_000, seed=1)
    data = load_ratings(str(tmp_path / "a"))  # the folder, as a pipeline reads it
    assert len(data) == 12_000 and path.endswith("ratings.parquet")
    assert len(set(zip(data.users.tolist(), data.items.tolist()))) == 12_000
    assert set(np.unique(data.ratings * 2)) <= set(range(1, 11))  # half stars 0.5..5
    per_item = np.sort(np.bincount(data.items))[::-1]
    per_user = np.sort(np.bincount(data.users))[::-1]
    assert per_item[: len(per_item) // 10].sum() > 0.3 * len(data)  # popular items dominate
    assert per_user[: len(per_user) // 10].sum() > 0.25 * len(data)  # heavy users too
    again = load_ratings(make_ratings(str(tmp_path / "b"), 400, 300, 12_000, seed=1))
    other = load_ratings(make_ratings(str(tmp_path / "c"), 400, 300, 12_000, seed=2))
    assert np.array_equal(again.ratings, data.ratings) and np.array_equal(again.items, data.items)
    assert not np.array_equal(other.items, data.items)
    train, test = rating_split(data)
    model = ALS(factors=8, iterations=8, regularization=0.05).fit(train)
    held_out = rmse(test.ratings, model.predict(test.users, test.items))
    assert held_out < rmse(test.ratings, np.full(len(test), train.ratings.mean()))


def test_make_ratings_refuses_what_it_cannot_make(tmp_path, capsys):
    from rayline import cli

    for users, items, ratings, needle in (
        ("10", "10", "90", "over half"),
        ("0", "10", "5", "at least 1"),
        ("10" * 5, "10" * 5, str(10**15), "GiB"),  # valid, far more than this machine holds
    ):
        command = ["data", "make-ratings", str(tmp_path), "--users", users, "--items", items]
        assert cli.main([*command, "--ratings", ratings]) == 2
        assert needle in capsys.readouterr().err


@pytest.mark.blas
def test_knn_neighbours_are_the_same_in_blocks_and_as_ray_tasks(ray_session, monkeypatch):
    from rayline.recsys import knn

    data, _ = synthetic_ratings(120, 80, rank=3, density=0.2, seed=6)
    reference = UserKNN(similarity="pearson", k=10, pool=30).fit(data)
    monkeypatch.setattr(knn, "BLOCK_FLOATS", 7 * 120)  # 7 rows at a time, in this process
    blocked = UserKNN(similarity="pearson", k=10, pool=30).fit(data)
    assert np.array_equal(blocked.neighbors, reference.neighbors)
    assert np.array_equal(blocked.neighbor_sims, reference.neighbor_sims)
    for workers in (1, 2, 3):
        on_ray = UserKNN(similarity="pearson", k=10, pool=30, workers=workers).fit(data)
        assert np.array_equal(on_ray.neighbors, reference.neighbors), workers
        assert np.array_equal(on_ray.neighbor_sims, reference.neighbor_sims), workers


def test_parquet_parts_directory_loads_as_one_data_set(tmp_path):
    data, _ = synthetic_ratings(40, 30, seed=7)
    table = pa.table(
        {
            "userId": data.users + 100,
            "movieId": data.items + 5000,
            "rating": data.ratings,
            "comment": ["x"] * len(data),  # a column the loader need not read
        }
    )
    parts = tmp_path / "ratings" / "year=2026"
    parts.mkdir(parents=True)
    half = len(data) // 2
    pq.write_table(table.slice(0, half), parts / "part-0000.parquet")
    pq.write_table(table.slice(half), parts / "part-0001.parquet")
    loaded = load_ratings(str(tmp_path / "ratings"))
    assert len(loaded) == len(data)
    assert np.array_equal(loaded.user_ids, data.user_ids + 100)
    assert np.array_equal(loaded.item_ids, data.item_ids + 5000)
    # the same ratings, pair for pair, whatever order the parts come back in
    assert (loaded.matrix() != data.matrix()).nnz == 0
    with pytest.raises(DataError, match="missing column 'score'.*userId"):
        load_ratings(str(tmp_path / "ratings"), columns=("userId", "movieId", "score"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"\*.parquet parts"):
        load_ratings(str(tmp_path / "empty"))


def per_row_normal_equations(matrix, fixed, fixed_bias, offset, regularization, implicit, alpha):
    """The oracle: each row's ALS solve, one row at a time, as the first ALS did."""
    f = fixed.shape[1]
    features = fixed if implicit else np.hstack([fixed, np.ones((len(fixed), 1))])
    out = np.zeros((matrix.shape[0], features.shape[1]))
    for row in range(matrix.shape[0]):
        columns = matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]]
        values = matrix.data[matrix.indptr[row] : matrix.indptr[row + 1]]
        if len(columns) == 0:
            continue
        y = features[columns]
        if implicit:
            confidence = 1.0 + alpha * values
            a = fixed.T @ fixed + (y.T * (confidence - 1.0)) @ y + regularization * np.eye(f)
            b = y.T @ confidence
        else:
            a = y.T @ y + regularization * len(columns) * np.eye(features.shape[1])
            b = y.T @ (values - offset - fixed_bias[columns])
        out[row] = np.linalg.solve(a, b)
    return out


@pytest.mark.blas
def test_batched_and_conjugate_gradient_solves_match_the_per_row_oracle(monkeypatch):
    from rayline.recsys import als

    data, _ = synthetic_ratings(150, 90, rank=3, density=0.2, seed=8)
    matrix = data.matrix().astype(np.float64)
    rng = np.random.default_rng(0)
    fixed, fixed_bias = rng.normal(0, 0.3, (90, 6)), rng.normal(0, 0.2, 90)
    for implicit in (False, True):
        settings = (fixed, fixed_bias, 3.5, 0.05, implicit, 10.0)
        oracle = per_row_normal_equations(matrix, *settings)
        # batched float64 solves against one at a time: ulps apart, 1e-6 is slack for
        # an ill-conditioned row
        assert np.allclose(als.solve_rows(matrix, *settings), oracle, rtol=0, atol=1e-6)
        start = np.zeros_like(oracle)
        for floats in (als.CG_BLOCK_FLOATS, 7 * 30):  # one batch; batches of ~30 ratings
            monkeypatch.setattr(als, "CG_BLOCK_FLOATS", floats)
            # CG converges in d steps in exact arithmetic: 12 steps from zero in float32
            solved = als.cg_rows(
                matrix, fixed, fixed_bias, start, 3.5, 0.05, implicit, 10.0, steps=12
            )
            assert np.allclose(solved, oracle, rtol=0, atol=2e-4), (implicit, floats)


def test_top_k_is_each_rows_best_k_in_order():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((50, 300))
    scores[:, ::7] = -np.inf  # seen or not a candidate
    top, values = top_k(scores, 10)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert np.array_equal(top, expected)
    assert np.array_equal(values, np.take_along_axis(scores, expected, axis=1))
    assert top_k(np.array([[2.0, 5.0, 5.0, 1.0]]), 2)[0].tolist() == [[1, 2]]  # ties in order
    top, values = top_k(scores[:, :4].astype(np.float32), 10)  # k past the row: all of it
    assert top.shape == (50, 4) and values.dtype == np.float32


def test_balanced_bounds_split_rows_by_their_ratings():
    from rayline.recsys.base import balanced_bounds

    indptr = np.concatenate([[0], np.cumsum([100, 1, 1, 1, 1, 100, 1, 1, 1, 93])])
    assert balanced_bounds(indptr, 2) == [(0, 5), (5, 10)]
    assert balanced_bounds(indptr, 1) == [(0, 10)]
    bounds = balanced_bounds(indptr, 50)  # more parts than rows
    assert bounds[0] == (0, 1) and bounds[-1] == (9, 10) and len(bounds) <= 10
    assert all(lo < hi for lo, hi in bounds)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert balanced_bounds(np.array([0, 0, 0, 0]), 2) == [(0, 2), (2, 3)]


@pytest.mark.blas
def test_top_k_for_every_user_in_blocks_and_on_ray(ray_session, monkeypatch):
    from rayline.recsys import base

    data, _ = synthetic_ratings(70, 50, rank=3, density=0.2, seed=9)
    model = ALS(factors=4, iterations=3, implicit=True).fit(data)
    candidates = np.arange(model.n_items) % 5 != 0
    top, scores = model.recommend(np.arange(model.n_users), 7, candidates=candidates)
    monkeypatch.setattr(base, "TOPK_BLOCK_FLOATS", 3 * model.n_items)  # 3 users a block
    for workers in (0, 2, 3):
        got_top, got_scores = model.recommend_all(7, candidates=candidates, workers=workers)
        # blocks of 3 users are products of another shape: scores to a few ulps
        assert_same_rankings(got_top, got_scores, top, scores, FLOAT64_RESHAPED, workers)
    assert not np.isin(top, np.flatnonzero(~candidates)).any()


@pytest.mark.blas
def test_served_top_k_for_many_users_at_once_is_each_users_own(tmp_path):
    from rayline.recsys.predictor import RecommenderService

    data, _ = synthetic_ratings(60, 40, rank=3, density=0.2, seed=10)
    registry = ModelRegistry(str(tmp_path))
    registry.register("als", ALS(factors=4, iterations=3).fit(data).save(), kind="recommender")
    registry.register("knn", UserKNN(similarity="cosine", k=5).fit(data).save(), kind="recommender")
    for name in ("als", "knn"):
        registry.promote(name, 1)
        service = RecommenderService(registry, name)
        requests = [("3", 5), ("no-such-user", 4), ("17", 10), ("3", 2), ("42", 5)]
        together = service.recommend_many(requests)
        alone = [service.recommend(user, k) for user, k in requests]
        # One user's scores come from a matrix-vector product, a batch's from a
        # matrix-matrix one: the same to a few ulps (FLOAT64_RESHAPED), not bit for bit.
        for got, want in zip(together, alone):
            assert_same_ranking(
                [item["item_id"] for item in got["items"]],
                [item["score"] for item in got["items"]],
                [item["item_id"] for item in want["items"]],
                [item["score"] for item in want["items"]],
                atol=FLOAT64_RESHAPED,
                context=(name, want["user_id"]),
            )
            assert without_scores(got, want) == without_scores(want, got), name
        assert together[1]["cold_start"] and len(together[1]["items"]) == 4
        assert [len(a["items"]) for a in together] == [5, 4, 10, 2, 5]
        if name == "knn":
            assert "because" in together[0]["items"][0]


def without_scores(answer: dict, among: dict) -> dict:
    """An answer with its items keyed by id, only those `among` holds too (a tie at the
    cut may keep another), and their scores left out (compared apart)."""
    items = {i["item_id"]: {k: v for k, v in i.items() if k != "score"} for i in answer["items"]}
    ids = {i["item_id"] for i in among["items"]}
    return {**answer, "items": {key: item for key, item in items.items() if key in ids}}
