import math

import numpy as np
import pytest

from loradrop.tasks.metrics import compute_metrics, majority_baseline
from loradrop.tasks.registry import get_task

# Confusion table by hand: TP=3, FN=2, FP=1, TN=4 (class 1 is "positive").
REFS = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]


def test_classification_scores_match_hand_computed_values():
    scores = compute_metrics("matthews", PREDS, REFS)
    assert scores["accuracy"] == pytest.approx(7 / 10)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(4*5*5*6)
    assert scores["matthews"] == pytest.approx(10 / math.sqrt(600))
    # F1(class 1) = 2*3 / (2*3 + 1 + 2) = 6/9; F1(class 0) = 2*4 / (2*4 + 2 + 1) = 8/11
    assert scores["f1"] == pytest.approx((6 / 9 + 8 / 11) / 2)
    assert scores["metric"] == scores["matthews"]


def test_main_metric_follows_the_task():
    assert compute_metrics(get_task("rotten-tomatoes"), PREDS, REFS)["metric"] == pytest.approx(0.7)
    assert compute_metrics("f1", PREDS, REFS)["metric"] == pytest.approx((6 / 9 + 8 / 11) / 2)


def test_logits_are_turned_into_label_ids():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.0]])
    assert compute_metrics("accuracy", logits, [1, 0, 2, 2])["accuracy"] == pytest.approx(0.75)


def test_spearman_matches_hand_computed_value():
    # ranks of the references with the tie averaged: [1, 2, 3.5, 5, 3.5]; rho = 8 / sqrt(10 * 9.5)
    scores = compute_metrics("spearman", np.array([[1.0], [2.0], [3.0], [4.0], [5.0]]), [5.0, 6.0, 7.0, 8.0, 7.0])
    assert scores == {"metric": pytest.approx(8 / math.sqrt(95)), "spearman": pytest.approx(8 / math.sqrt(95))}


def test_majority_baseline():
    train, evaluation = [0, 0, 1, 2], [0, 1, 1, 1]
    assert majority_baseline(train, evaluation, "accuracy") == pytest.approx(0.25)
    assert majority_baseline(train, evaluation, "matthews") == 0.0
    # F1(class 0) = 2*1 / (2*1 + 3 + 0) = 0.4, F1(class 1) = 0
    assert majority_baseline(train, evaluation, "f1") == pytest.approx(0.2)
    assert majority_baseline([1, 1, 0, 0], [0, 0, 1], "accuracy") == pytest.approx(2 / 3)  # tie -> smallest label
    assert majority_baseline([0.5, 1.5], [1.0, 2.0], "spearman") == 0.0


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: compute_metrics("bleu", [1], [1]), "unknown metric 'bleu'; known metrics: accuracy"),
        (lambda: compute_metrics("accuracy", [1, 0], [1]), "2 predictions but 1 references"),
        (lambda: compute_metrics("accuracy", [], []), "no references"),
        (lambda: majority_baseline([], [1], "accuracy"), "no training labels"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
