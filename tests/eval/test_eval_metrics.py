"""Metrics against hand-computed values (and LongBench's quirks)."""

import math

import pytest

from sparsekv_eval import metrics as M


def test_qa_f1_and_exact_match():
    # normalized: "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1
    assert M.qa_f1_score("The cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    assert M.qa_f1_score("Philip Dick", "Philip K. Dick") == pytest.approx(0.8)
    assert M.qa_f1_score("nothing", "Paris") == 0.0
    assert M.exact_match("The Paris!", "paris") == 1.0
    assert M.exact_match("Paris, France", "paris") == 0.0


def test_rouge_l_sentence_level():
    assert M.lcs_length("abcd", "acde") == 3
    assert M.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS "a c d": P = R = 3/4
    assert M.rouge_l("", "") == 1.0 and M.rouge_l("x", "") == 0.0
    assert M.rouge_l("Same words here", "same WORDS here.") == 1.0


def test_longbench_rouge_matches_rouge_package_semantics():
    # sentences split on "."; word sets: m = n = 5 distinct words; LCS union {the, cat, on, mat} = 4
    assert M.rouge_score("the cat sat. on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    assert M.rouge_score("", "reference text") == 0.0  # the package raises; LongBench scores 0
    assert M.rouge_score("...", "reference text") == 0.0


def test_longbench_count_retrieval_code_classification():
    assert M.count_score("There are 3 or 2 paragraphs", "2") == 0.5
    assert M.count_score("no digits", "2") == 0.0
    assert M.retrieval_score("Paragraph 2 and Paragraph 12", "Paragraph 2") == 0.5
    assert M.retrieval_zh_score("段落3", "段落3") == 1.0
    assert M.code_sim_score("```python\n    return a * b\n", "    return a * b") == 1.0
    # difflib ratio of "return x" vs "return y" = 14/16 = 87.5 -> round() -> 88
    assert M.code_sim_score("# comment\nreturn x", "return y") == pytest.approx(0.88)
    assert M.fuzz_ratio("", "") == 100 and M.fuzz_ratio("", "a") == 0
    classes = ["Individual", "Distance", "City", "Country"]
    assert M.classification_score("City", "City", all_classes=classes) == 1.0
    assert M.classification_score("City or Country", "City", all_classes=classes) == 0.5
    assert M.classification_score("Country", "City", all_classes=classes) == 0.0
    assert M.classification_score("no class at all", "City", all_classes=classes) == 0.0  # (sic)


def test_ruler_string_match():
    assert M.string_match_all("numbers are 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert M.string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    assert M.string_match_part("only 456", ["123", "456"]) == 1.0
    assert M.ruler_postprocess("  a\x00b\n ") == "a\nb"


def test_mean_ci95_and_wilson():
    m, hw, n = M.mean_ci95([0, 1, 1, 1])  # sd = 0.5 -> 1.96 * 0.5 / 2
    assert (m, n) == (0.75, 4) and hw == pytest.approx(0.49)
    m, hw, n = M.mean_ci95([1.0] * 30)  # all correct: Wilson half-width instead of 0
    lo, hi = M.wilson_interval(1.0, 30)
    assert m == 1.0 and hw == pytest.approx(1.0 - lo) and 0.05 < hw < 0.15 and hi == pytest.approx(1.0)
    assert math.isnan(M.mean_ci95([])[0])


def test_fidelity():
    f = M.fidelity(["Paris", "42 apples"], ["Paris", "41 apples"])
    assert f["n"] == 2 and f["identical"] == 1
    assert f["rouge_l"] == pytest.approx(0.75)  # 1.0 and 0.5
    assert f["exact_match"] == pytest.approx(0.5)
    assert f["token_f1"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        M.fidelity(["a"], [])
