"""jaxnet.datasets: offline loaders, their shapes and fixed splits, user files, bad data."""

import importlib
import random

import numpy as np
import pytest

from jaxnet import datasets


@pytest.mark.parametrize("name, sizes, features", [
    ("digits", (1257, 180, 360), 64),
    ("mnist1d", (3600, 400, 1000), 40),
    ("mnist5k", (3500, 500, 1000), 784),
])
def test_builtin_classification_sets_have_their_documented_shapes_and_splits(name, sizes,
                                                                             features):
    data = datasets.load(name)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == sizes
    assert data.num_classes == 10 and data.task == "classification"
    for x, y in ((data.x_train, data.y_train), (data.x_val, data.y_val),
                 (data.x_test, data.y_test)):
        assert x.dtype == np.float32 and x.shape[1] == features and y.dtype == np.int32
        assert len(x) == len(y) and set(np.unique(y)) <= set(range(10))
    # every class appears in every part (stratified, or mnist1d's own test set)
    assert len(np.unique(data.y_val)) == len(np.unique(data.y_test)) == 10
    if name != "mnist1d":
        assert data.x_train.min() >= 0 and data.x_train.max() <= 1
    again = datasets.load(name)
    np.testing.assert_array_equal(again.x_test, data.x_test)  # the split is fixed
    again.x_test[:] = -1  # callers get their own arrays
    assert datasets.load(name).x_test.max() > -1


def test_digits_test_set_is_scikit_learns_stratified_80_20_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    _, x_test, _, y_test = train_test_split(d.data / 16, d.target, test_size=0.2,
                                            stratify=d.target, random_state=42)
    data = datasets.digits()
    np.testing.assert_allclose(data.x_test, x_test, rtol=1e-6)
    np.testing.assert_array_equal(data.y_test, y_test)


def test_mnist5k_is_shuffled_before_splitting():
    data = datasets.mnist5k()
    assert len(np.unique(data.y_train[:100])) == 10  # the raw rows come sorted by class
    counts = np.bincount(data.y_test, minlength=10)
    assert counts.min() == counts.max() == 100


def test_mnist1d_leaves_the_global_random_state_alone():
    # Import first: importing these packages may draw from Python's random module itself.
    importlib.import_module("mnist1d.data")
    importlib.import_module("sklearn.model_selection")
    np.random.seed(123)
    random.seed(123)
    want = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    datasets._mnist1d_raw.cache_clear()  # generate it again now
    datasets.mnist1d()
    assert (np.random.rand(), random.random()) == want


def test_minimal_is_the_course_regression_with_a_seed():
    x, t = datasets.minimal_data(1000, seed=1)
    assert x.shape == (1000, 2) and t.shape == (1000, 1)
    assert np.abs(x).max() <= 10
    noise = t[:, 0] - (2 * x[:, 0] - 3 * x[:, 1] + 5)
    assert np.abs(noise).max() <= 1 + 1e-4 and abs(noise.mean()) < 0.1
    np.testing.assert_array_equal(datasets.minimal_data(1000, seed=1)[0], x)
    assert not np.array_equal(datasets.minimal_data(1000, seed=2)[0], x)
    data = datasets.minimal(seed=1)
    assert data.num_classes is None and data.task == "regression"
    assert data.sizes == {"train": 700, "val": 100, "test": 200}
    assert data.y_train.shape == (700, 1)


def test_npz_and_csv_files_load_and_split(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), np.arange(50) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = datasets.load(str(tmp_path / "d.npz"))
    assert data.num_classes == 5 and sum(data.sizes.values()) == 50 and data.num_features == 3
    rows = ["a,label,b,c"] + [f"{u},{k},{v},{w}" for (u, v, w), k in zip(x, y)]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    csv = datasets.load(str(tmp_path / "d.csv"), label_column="label")
    np.testing.assert_allclose(np.sort(csv.x_test[:, 0]), np.sort(data.x_test[:, 0]), rtol=1e-6)
    (tmp_path / "t.csv").write_text("f,kind\n1,cat\n2,dog\n3,cat\n4,dog\n5,cat\n6,dog\n")
    text = datasets.load(str(tmp_path / "t.csv"), label_column="kind")
    assert text.num_classes == 2


@pytest.mark.parametrize("x, y, classes, message", [
    (np.zeros((0, 2)), np.zeros(0), 2, "empty"),
    (np.zeros((3, 2)), np.zeros(2), 2, "different lengths"),
    (np.array([[0.0], [np.inf]]), np.zeros(2), 2, "NaN or infinity (first in row 1"),
    (np.zeros((2, 1)), np.array([0.0, np.nan]), 2, "labels contain NaN"),
    (np.zeros((2, 1)), np.array([0.0, 1.5]), 2, "must be integers, got 1.5 in row 1"),
    (np.zeros((2, 1)), np.array([0, 2]), 2, "label 2 in row 1 is outside [0, 2)"),
    (np.zeros((2, 1)), np.array([-1, 0]), 2, "label -1 in row 0 is outside"),
])
def test_validate_refuses_data_that_cannot_be_trained_on(x, y, classes, message):
    with pytest.raises(datasets.DataError) as e:
        datasets.validate(x, y, classes)
    assert message in str(e.value)


def test_unknown_names_and_files_are_refused(tmp_path):
    with pytest.raises(datasets.DataError, match="unknown data set 'cifar'"):
        datasets.load("cifar")
    with pytest.raises(datasets.DataError, match="no such file"):
        datasets.load(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", inputs=np.zeros((3, 1)))
    with pytest.raises(datasets.DataError, match="needs arrays named 'x' and 'y'"):
        datasets.load(str(tmp_path / "bad.npz"))
    (tmp_path / "bad.csv").write_text("a,label\n1,0\nfoo,1\n")
    with pytest.raises(datasets.DataError, match="line 3, column 'a': 'foo' is not a number"):
        datasets.load(str(tmp_path / "bad.csv"), label_column="label")
