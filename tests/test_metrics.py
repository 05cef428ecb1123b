"""The evaluate.Metric wrappers against sacrebleu's and rouge-score's own results, and the paired tests."""

from __future__ import annotations

import os

import pytest

from tasks.metrics import (
    ChrfMetric,
    ExactMatchMetric,
    RougeMetric,
    SacreBleuMetric,
    bootstrap_exact_match_delta,
    bootstrap_rouge_l_delta,
    paired_bootstrap_bleu,
    paired_bootstrap_chrf,
)

PAIRED_TESTS = [paired_bootstrap_bleu, bootstrap_rouge_l_delta, paired_bootstrap_chrf, bootstrap_exact_match_delta]

REFERENCES = [
    "the cat sat on the mat",
    "a dog runs quickly in the green park",
    "hello there general kenobi",
    "we walked to the river before sunset",
    "she reads two books every week",
    "the train leaves at nine in the morning",
] * 5
WEAKER = [
    "the cat is on a mat",
    "a dog ran in a park",
    "hello there",
    "we went to a river",
    "she read books",
    "a train leaves at nine",
] * 5


def test_identical_strings_score_100():
    bleu = SacreBleuMetric().compute(predictions=REFERENCES, references=REFERENCES)
    rouge = RougeMetric().compute(predictions=REFERENCES, references=REFERENCES)
    assert bleu["score"] == pytest.approx(100.0)
    assert rouge == {key: pytest.approx(100.0) for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    assert ChrfMetric().compute(predictions=REFERENCES, references=REFERENCES)["score"] == pytest.approx(100.0)
    assert ExactMatchMetric().compute(predictions=REFERENCES, references=REFERENCES) == {"exact_match": 100.0}


def test_chrf_equals_sacrebleu_corpus_chrf_and_signature():
    import sacrebleu
    from sacrebleu.metrics import CHRF

    result = ChrfMetric().compute(predictions=WEAKER, references=REFERENCES)
    assert 0 < result["score"] < 100
    assert result["score"] == pytest.approx(sacrebleu.corpus_chrf(WEAKER, [REFERENCES]).score, abs=1e-9)
    chrf = CHRF()
    chrf.corpus_score(WEAKER, [REFERENCES])
    assert result["signature"] == str(chrf.get_signature())


def test_exact_match_counts_whole_answers_after_trimming():
    predictions = [" the cat sat on the mat\n", "a dog runs", "Hello there general kenobi", "we walked"]
    references = ["the cat sat on the mat", "a dog runs", "hello there general kenobi", "we walked to the river"]
    # trimmed equal, equal, case differs, prefix only: 2 of 4
    assert ExactMatchMetric().compute(predictions=predictions, references=references) == {"exact_match": 50.0}


def test_bleu_equals_sacrebleu_corpus_bleu_and_signature():
    import sacrebleu
    from sacrebleu.metrics import BLEU

    result = SacreBleuMetric().compute(predictions=WEAKER, references=REFERENCES)
    direct = sacrebleu.corpus_bleu(WEAKER, [REFERENCES])
    assert 0 < result["score"] < 100
    assert result["score"] == pytest.approx(direct.score, abs=1e-9)
    assert result["counts"] == list(direct.counts) and result["sys_len"] == direct.sys_len
    bleu = BLEU()
    bleu.corpus_score(WEAKER, [REFERENCES])
    assert result["signature"] == str(bleu.get_signature())
    assert "tok:13a" in result["signature"] and "nrefs:1" in result["signature"]


def test_bleu_known_multi_reference_case():
    # sacrebleu's own documented example: 39.8 with two references per prediction.
    predictions = ["hello there general kenobi", "on our way to ankh morpork"]
    references = [["hello there general kenobi", "hello there !"], ["goodbye ankh morpork", "ankh morpork"]]
    result = SacreBleuMetric().compute(predictions=predictions, references=references)
    assert round(result["score"], 1) == 39.8
    assert "nrefs:2" in result["signature"]


def test_rouge_equals_rouge_score_directly():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    per_pair = [scorer.score(ref, pred) for ref, pred in zip(REFERENCES, WEAKER, strict=True)]
    result = RougeMetric().compute(predictions=WEAKER, references=REFERENCES)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = 100 * sum(s[key].fmeasure for s in per_pair) / len(per_pair)
        assert result[key] == pytest.approx(expected, abs=1e-9)
        assert 0 < result[key] < 100


def test_rouge_known_small_case():
    # "the cat sat" against "the cat sat on the mat": precision 1, recall 3/6 -> F = 2/3.
    result = RougeMetric().compute(predictions=["the cat sat"], references=["the cat sat on the mat"])
    assert result["rouge1"] == pytest.approx(200 / 3)
    assert result["rougeL"] == pytest.approx(200 / 3)
    assert result["rouge2"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)  # 2 of 2 bigrams, 2 of 5 reference bigrams


@pytest.mark.parametrize("test", PAIRED_TESTS)
def test_system_against_itself_is_delta_zero_p_one(test):
    result = test(REFERENCES, WEAKER, list(WEAKER), resamples=1000, seed=7)
    assert result.delta == 0.0
    assert (result.ci_low, result.ci_high) == (0.0, 0.0)
    assert result.p_value == pytest.approx(1.0)
    assert not result.significant


@pytest.mark.parametrize("test", PAIRED_TESTS)
def test_clearly_better_system_is_significant_both_ways(test):
    better = test(REFERENCES, WEAKER, REFERENCES, resamples=1000, seed=7)
    assert better.delta > 20 and better.significant and better.p_value < 0.01
    assert 0 < better.ci_low <= better.delta <= better.ci_high
    worse = test(REFERENCES, REFERENCES, WEAKER, resamples=1000, seed=7)
    assert worse.delta == pytest.approx(-better.delta)
    assert worse.significant and worse.ci_high < 0


@pytest.mark.parametrize("test", PAIRED_TESTS)
def test_equally_good_systems_with_different_errors_are_not_significant(test):
    # A errs on the first half of the rows, B on the second half, the same errors: no real difference.
    half = len(REFERENCES) // 2
    system_a = WEAKER[:half] + REFERENCES[half:]
    system_b = REFERENCES[:half] + WEAKER[half:]
    assert system_a != system_b
    result = test(REFERENCES, system_a, system_b, resamples=1000, seed=7)
    assert abs(result.delta) < 5
    assert result.ci_low < 0 < result.ci_high
    assert result.p_value > 0.05 and not result.significant


def test_bleu_p_value_is_sacrebleus_own_and_seeded():
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    half = len(REFERENCES) // 2
    system_b = REFERENCES[:half] + WEAKER[half:]
    ours = paired_bootstrap_bleu(REFERENCES, WEAKER, system_b, resamples=500, seed=99)
    assert ours == paired_bootstrap_bleu(REFERENCES, WEAKER, system_b, resamples=500, seed=99)
    assert "SACREBLEU_SEED" not in os.environ or os.environ["SACREBLEU_SEED"] != "99"
    os.environ["SACREBLEU_SEED"] = "99"
    try:
        _, results = PairedTest([("a", WEAKER), ("b", system_b)], {"BLEU": BLEU()}, [REFERENCES],
                                test_type="bs", n_samples=500)()
    finally:
        del os.environ["SACREBLEU_SEED"]
    assert ours.p_value == pytest.approx(results["BLEU"][1].p_value)
    assert ours.delta == pytest.approx(results["BLEU"][1].score - results["BLEU"][0].score)


def test_paired_tests_refuse_unpaired_inputs():
    with pytest.raises(ValueError, match="both systems must answer every reference"):
        paired_bootstrap_bleu(REFERENCES, WEAKER[:-1], WEAKER)
    with pytest.raises(ValueError, match="both systems must answer every reference"):
        bootstrap_rouge_l_delta(REFERENCES, WEAKER, WEAKER[:-1])
    with pytest.raises(ValueError, match="seed 0"):
        paired_bootstrap_bleu(REFERENCES, WEAKER, WEAKER, seed=0)
