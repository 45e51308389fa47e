from collections import Counter

import pytest
from datasets import Dataset

from loradrop import stratified_sample


def rows(counts: dict[int, int]) -> list[dict]:
    return [{"text": f"{label}-{i}", "label": label} for label, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("counts,ratio", [({0: 700, 1: 250, 2: 50}, 0.1), ({0: 33, 1: 7}, 0.25), ({0: 9, 1: 3, 2: 1}, 0.1)])
def test_keeps_class_proportions_within_one(counts, ratio):
    sample = stratified_sample(rows(counts), ratio, seed=1)
    got = Counter(r["label"] for r in sample)
    for label, n in counts.items():
        assert abs(got[label] - ratio * n) <= 1 or got[label] == 1
        assert got[label] >= 1


def test_deterministic_by_seed_and_no_duplicates():
    data = rows({0: 100, 1: 100})
    a, b, c = (stratified_sample(data, 0.2, seed=s) for s in (4, 4, 5))
    assert a == b and a != c
    assert len({r["text"] for r in a}) == len(a) == 40


def test_works_on_datasets_dataset():
    ds = Dataset.from_list(rows({0: 60, 1: 40}))
    sample = stratified_sample(ds, 0.5, label_column="label", seed=0)
    assert isinstance(sample, Dataset)
    assert Counter(sample["label"]) == {0: 30, 1: 20}


def test_regression_falls_back_to_random_sample():
    data = [{"x": i, "label": i / 7} for i in range(50)]
    sample = stratified_sample(data, 0.2, seed=0)
    assert len(sample) == 10 and sample == stratified_sample(data, 0.2, seed=0)


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        stratified_sample([], 0.1)
    with pytest.raises(ValueError, match="ratio=0"):
        stratified_sample(rows({0: 5}), 0)
    with pytest.raises(ValueError, match="label_column='y' is not a column"):
        stratified_sample(rows({0: 5}), 0.5, label_column="y")
