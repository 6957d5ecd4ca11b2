"""Metrics on hand-made cases, and against sacreBLEU / rouge-score where those are installed."""

import pytest

from inlaid.eval import metrics


@pytest.mark.parametrize("prediction, reference, expected", [
    ("Paris", "Paris", 100.0),
    ("  paris.  ", "Paris", 100.0),
    ("The  Euro", "the euro", 100.0),
    ("Paris, France", "Paris", 0.0),
    ("", "Paris", 0.0),
])
def test_exact_match(prediction, reference, expected):
    assert metrics.exact_match(prediction, reference) == expected


def test_chrf_bounds_and_hand_case():
    assert metrics.chrf("mille deux cents", "mille deux cents") == pytest.approx(100.0)
    assert metrics.chrf("xyz", "abc") == 0.0
    assert metrics.chrf("", "abc") == 0.0
    # "ab" vs "abc": unigrams P=1, R=2/3; bigrams P=1, R=1/2; trigram order skipped (hyp too short).
    p, r = 1.0, (2 / 3 + 1 / 2) / 2
    assert metrics.chrf("ab", "abc") == pytest.approx(100 * 5 * p * r / (4 * p + r))
    # whitespace is ignored
    assert metrics.chrf("vingt et un", "vingtetun") == pytest.approx(100.0)


@pytest.mark.parametrize("prediction, reference", [
    ("cent quatre-vingt-dix-neuf", "cent quatre-vingt-dix-huit"),
    ("dimanche 7 mars 2021", "Sonntag, 7. März 2021"),
    ("vier Millionen", "vier Millionen dreihundert"),
    ("a", "abcdefgh"),
    ("the cat sat on the mat", "the cat is on the mat"),
])
def test_chrf_matches_sacrebleu(prediction, reference):
    sacrebleu = pytest.importorskip("sacrebleu")
    expected = sacrebleu.metrics.CHRF().sentence_score(prediction, [reference]).score
    assert metrics.chrf(prediction, reference) == pytest.approx(expected, abs=1e-6)


def test_lcs_length():
    assert metrics.lcs_length([], [1, 2]) == 0
    assert metrics.lcs_length([1, 2, 3, 4], [2, 4]) == 2
    assert metrics.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_rouge_l_hand_case():
    # LCS "the cat on the mat" = 5 of 6 words on both sides.
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(100 * 5 / 6)
    assert metrics.rouge_l("The cat.", "the CAT") == pytest.approx(100.0)
    assert metrics.rouge_l("", "the cat") == 0.0
    assert metrics.rouge_l("dog", "the cat") == 0.0


@pytest.mark.parametrize("prediction, reference", [
    ("France is a country in Western Europe with its capital Paris.",
     "France is a country with its capital Paris and a population of 66,078,000."),
    ("Kenya, capital Nairobi", "Kenya is a country in Eastern Africa with its capital Nairobi."),
    ("a b c d", "d c b a"),
])
def test_rouge_l_matches_rouge_score(prediction, reference):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert metrics.rouge_l(prediction, reference) == pytest.approx(100 * expected)


@pytest.mark.parametrize("text, number", [
    ("The answer is 1,234.", 1234.0), ("-7 degrees", -7.0), ("pi is 3.14", 3.14), ("none", None),
])
def test_first_number(text, number):
    assert metrics.first_number(text) == number


def test_numeric_match():
    assert metrics.numeric_match("She has 42 apples.", "42") == 100.0
    assert metrics.numeric_match("42", "42") == 100.0
    assert metrics.numeric_match("1,000", "1000") == 100.0
    assert metrics.numeric_match("12 boxes of 3", "36") == 0.0  # the first number counts
    assert metrics.numeric_match("forty-two", "42") == 0.0


def test_final_number_match():
    assert metrics.final_number_match("12 * 3 + 4 = 40", "12 * 3 + 4 = 40") == 100.0
    assert metrics.final_number_match("12 * 3 + 4 = 40.", "40") == 100.0
    assert metrics.final_number_match("12 * 3 + 4 = 41", "12 * 3 + 4 = 40") == 0.0
    assert metrics.final_number_match("no idea", "40") == 0.0


def test_registry_names():
    assert set(metrics.METRICS) == {"chrf", "rouge_l", "exact_match", "numeric_match", "final_number_match"}
