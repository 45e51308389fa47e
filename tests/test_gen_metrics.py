import math

import pytest

from loradrop.tasks.gen_metrics import (
    GENERATION_METRICS,
    bleu,
    choice_accuracy,
    chrf,
    compute_generation_metrics,
    exact_match,
    extract_final_answer,
    normalize_choice,
    normalize_number,
    rouge_l,
    rouge_l_scores,
)


@pytest.mark.parametrize("text, expected", [
    ("1,000.50", "1000.5"), ("$12.0", "12"), ("12.", "12"), ("-0.0", "0"), ("100", "100"), ("0.25", "0.25"),
    ("$ 1,234", "1234"), ("50%", "50"), ("abc", None), ("", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("6 * 2 = <<6*2=12>>12 inches.\n#### 1,234", "1234"),   # the GSM8K marker wins over earlier numbers
    ("so it costs $18.00 in all.\n#### $18.00", "18"),
    ("The answer is \\boxed{42}. Check: 40 + 2", "42"),       # boxed, before trailing numbers
    ("3 apples, then 7 more, so 10.", "10"),                  # no marker: the last number
    ("I do not know", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_exact_match_by_hand():
    predictions = ["First 5 + 5 = 10.\n#### 10", "#### 11", "no idea", "so $1,000.00 total"]
    references = ["x = 10\n#### 10", "#### 12", "#### 5", "#### 1000"]
    assert exact_match(predictions, references) == 2 / 4  # rows 1 and 4


def test_choice_accuracy_by_hand():
    assert [normalize_choice(t) for t in ("Yes, because", "(B) Paris", "C.", "  ")] == ["yes", "b", "c", ""]
    assert choice_accuracy(["Yes, because", "(B) Paris", "no"], ["yes", "b", "Yes"]) == 2 / 3


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": P = R = F = 5/6
    assert rouge_l(["the cat sat on the mat", "a b"], ["the cat is on the mat", "c d"]) == pytest.approx((5 / 6 + 0) / 2)
    assert rouge_l_scores(["the cat sat on the mat", "a b"], ["the cat is on the mat", "c d"]) == pytest.approx([5 / 6, 0])


def test_bleu_by_hand():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty)
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-6)
    assert bleu(["same words here exactly"], ["same words here exactly"]) == pytest.approx(100)


def test_chrf_extremes():
    assert chrf(["identical text"], ["identical text"]) == pytest.approx(100)
    assert chrf(["abc"], ["xyz"]) == 0.0


def test_compute_generation_metrics():
    scores = compute_generation_metrics("exact_match", ["#### 3", "#### 4"], ["#### 3", "#### 5"])
    assert scores == {"metric": 0.5, "exact_match": 0.5}
    assert set(GENERATION_METRICS) == {"exact_match", "choice_accuracy", "rougeL", "bleu", "chrf"}


def test_compute_generation_metrics_errors():
    with pytest.raises(ValueError, match="unknown generation metric 'f1'; known: exact_match"):
        compute_generation_metrics("f1", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_generation_metrics("rougeL", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no references"):
        compute_generation_metrics("bleu", [], [])
