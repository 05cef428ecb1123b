"""Text-overlap metrics and their significance tests, on one 0-100 points scale.

BLEU and chrF are sacrebleu's corpus scores, ROUGE is Google's rouge-score, and exact match is the
share of answers equal to their reference (whitespace-trimmed); each is wrapped as an `evaluate.Metric`
defined here (the hub-hosted metric scripts need the network). No n-gram is counted in this module:
the wrappers and the tests call the libraries' own scorers and statistics.

Significance of a difference between two systems on the same references:
- BLEU and chrF: sacrebleu's paired bootstrap resampling (`PairedTest(..., test_type="bs")`, the
  Moses test) for the p-value, and the 95% percentile interval of the delta over the same resamples.
- ROUGE-L and exact match: a paired bootstrap over per-sample scores (the corpus value is their
  mean, so resampling samples is exact), giving the delta's 95% interval and a two-sided p-value.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import evaluate
import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BLEU_NAME = "BLEU"  # the key sacrebleu's PairedTest files BLEU results under
CHRF_NAME = "chrF"


def _features(multi_reference: bool) -> datasets.Features:
    reference = datasets.Value("string", id="sequence")
    return datasets.Features({
        "predictions": datasets.Value("string", id="sequence"),
        "references": datasets.Sequence(reference, id="references") if multi_reference else reference,
    })


def _reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """sacrebleu wants one list per reference *set*; evaluate hands us the references per prediction."""
    per_prediction = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    count = len(per_prediction[0]) if per_prediction else 1
    if any(len(refs) != count for refs in per_prediction):
        raise ValueError("BLEU needs the same number of references for every prediction")
    return [[refs[i] for refs in per_prediction] for i in range(count)]


class _InMemoryMetric(evaluate.Metric):
    """A metric that keeps its inputs in memory: no cache files, no locks, nothing left on disk."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("keep_in_memory", True)
        super().__init__(**kwargs)


SACREBLEU_URL = "https://github.com/mjpost/sacrebleu"


def _metric_info(description: str, citation: str, url: str | None = None,
                 multi_reference: bool = False) -> evaluate.MetricInfo:
    """The MetricInfo of one of these wrappers; `multi_reference` accepts several references per prediction."""
    features = ([_features(multi_reference=False), _features(multi_reference=True)] if multi_reference
                else _features(multi_reference=False))
    references = "a string or a list of strings each" if multi_reference else "list of strings (one per prediction)"
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=f"predictions: list of strings; references: {references}",
        features=features,
        codebase_urls=[url] if url else [],
    )


class SacreBleuMetric(_InMemoryMetric):
    """Corpus BLEU from sacrebleu (0-100) with its signature string, the way to reproduce the number."""

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info("Corpus BLEU computed by sacrebleu (sacrebleu.metrics.BLEU.corpus_score).",
                            "Post, 2018. A Call for Clarity in Reporting BLEU Scores.", SACREBLEU_URL,
                            multi_reference=True)

    def _compute(self, predictions: list[str], references: list[Any], tokenize: str | None = None,
                 lowercase: bool = False) -> dict[str, Any]:
        from sacrebleu.metrics import BLEU

        bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
        result = bleu.corpus_score(list(predictions), _reference_streams(references))
        return {
            "score": float(result.score),
            "signature": str(bleu.get_signature()),  # only known once references were seen
            "counts": list(result.counts),
            "totals": list(result.totals),
            "precisions": [float(p) for p in result.precisions],
            "bp": float(result.bp),
            "sys_len": int(result.sys_len),
            "ref_len": int(result.ref_len),
        }


class ChrfMetric(_InMemoryMetric):
    """Corpus chrF from sacrebleu (0-100; character n-gram F-score, beta 2) with its signature string."""

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info("Corpus chrF computed by sacrebleu (sacrebleu.metrics.CHRF.corpus_score).",
                            "Popovic, 2015. chrF: character n-gram F-score for automatic MT evaluation.",
                            SACREBLEU_URL, multi_reference=True)

    def _compute(self, predictions: list[str], references: list[Any]) -> dict[str, Any]:
        from sacrebleu.metrics import CHRF

        chrf = CHRF()
        result = chrf.corpus_score(list(predictions), _reference_streams(references))
        return {"score": float(result.score), "signature": str(chrf.get_signature())}


def exact_match_per_sample(references: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
    """1.0 where the prediction equals its reference after trimming surrounding whitespace, else 0.0."""
    return np.array([float(p.strip() == r.strip()) for r, p in zip(references, predictions, strict=True)],
                    dtype=np.float64)


class ExactMatchMetric(_InMemoryMetric):
    """Share of predictions equal to their reference (whitespace-trimmed, case kept), in points 0-100."""

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info("Exact match: the share of predictions identical to their reference after strip().", "")

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        matches = exact_match_per_sample(references, predictions)
        return {"exact_match": float(matches.mean() * 100.0) if matches.size else 0.0}


def rouge_scorer(rouge_types: Sequence[str] = ROUGE_TYPES) -> Any:
    from rouge_score import rouge_scorer as scorer_module

    return scorer_module.RougeScorer(list(rouge_types), use_stemmer=True)


def rouge_per_sample(references: Sequence[str], predictions: Sequence[str],
                     rouge_types: Sequence[str] = ROUGE_TYPES) -> dict[str, np.ndarray]:
    """rouge-score F-measures of every (reference, prediction) pair, as fractions in [0, 1]."""
    scorer = rouge_scorer(rouge_types)
    scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions, strict=True)]
    return {key: np.array([s[key].fmeasure for s in scores], dtype=np.float64) for key in rouge_types}


class RougeMetric(_InMemoryMetric):
    """ROUGE-1/2/L/Lsum F-measures from rouge-score (Porter stemming), averaged over samples, x100.

    The corpus value is the plain mean of the per-sample F-measures: deterministic, unlike the
    `mid` of rouge-score's BootstrapAggregator (a median of unseeded bootstrap means).
    """

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info("ROUGE F-measures computed by rouge-score (rouge_scorer.RougeScorer), in points.",
                            "Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
                            "https://github.com/google-research/google-research/tree/master/rouge")

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        per_sample = rouge_per_sample(references, predictions)
        return {key: float(values.mean() * 100.0) if values.size else 0.0 for key, values in per_sample.items()}


@dataclass(frozen=True)
class Comparison:
    """`system_b - system_a` on one metric, in points, with a 95% interval and a two-sided p-value."""

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_paired(references: Sequence[str], system_a: Sequence[str], system_b: Sequence[str],
                  resamples: int) -> None:
    if not references:
        raise ValueError("a paired test needs at least one reference")
    if not len(references) == len(system_a) == len(system_b):
        raise ValueError(
            f"paired test: {len(references)} references, {len(system_a)} and {len(system_b)} outputs; "
            "both systems must answer every reference"
        )
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


@contextmanager
def _sacrebleu_seed(seed: int) -> Iterator[None]:
    """PairedTest reads its seed from SACREBLEU_SEED (and treats 0 as 'unseeded'): set it for one call."""
    if seed == 0:
        raise ValueError("seed must be non-zero: sacrebleu's PairedTest treats seed 0 as 'no seed'")
    previous = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = previous


def paired_bootstrap_bleu(references: Sequence[str], system_a: Sequence[str], system_b: Sequence[str],
                          resamples: int = 1000, seed: int = 12345,
                          significance_level: float = 0.05) -> Comparison:
    """BLEU(system_b) - BLEU(system_a) with sacrebleu's paired bootstrap test (see paired_bootstrap_sacrebleu)."""
    from sacrebleu.metrics import BLEU

    return paired_bootstrap_sacrebleu(BLEU_NAME, BLEU(), references, system_a, system_b, resamples, seed,
                                      significance_level)


def paired_bootstrap_chrf(references: Sequence[str], system_a: Sequence[str], system_b: Sequence[str],
                          resamples: int = 1000, seed: int = 12345,
                          significance_level: float = 0.05) -> Comparison:
    """chrF(system_b) - chrF(system_a) with sacrebleu's paired bootstrap test (see paired_bootstrap_sacrebleu)."""
    from sacrebleu.metrics import CHRF

    return paired_bootstrap_sacrebleu(CHRF_NAME, CHRF(), references, system_a, system_b, resamples, seed,
                                      significance_level)


def paired_bootstrap_sacrebleu(name: str, scorer: Any, references: Sequence[str], system_a: Sequence[str],
                               system_b: Sequence[str], resamples: int = 1000, seed: int = 12345,
                               significance_level: float = 0.05) -> Comparison:
    """score(system_b) - score(system_a) for a sacrebleu corpus metric (`name` labels it for PairedTest),
    with sacrebleu's paired bootstrap test.

    The p-value is sacrebleu's. The 95% interval is the 2.5/97.5 percentiles of the per-resample
    delta, computed from sacrebleu's own sufficient statistics on the very resamples PairedTest
    draws (same generator, same seed). When every sentence has identical statistics in both systems
    the delta is 0 under any resampling: p is 1 by definition (sacrebleu's strict `>` would report
    1/(resamples+1) there, i.e. call a system significantly different from itself).
    """
    from sacrebleu.significance import PairedTest

    _check_paired(references, system_a, system_b, resamples)
    refs = [list(references)]
    with _sacrebleu_seed(seed):
        test = PairedTest([("a", list(system_a)), ("b", list(system_b))], {name: scorer}, refs,
                          test_type="bs", n_samples=resamples)
        _, results = test()
    name = next(key for key in test.metrics)  # sacrebleu renames some metrics (chrF -> chrF2, its beta)
    score_a, score_b = results[name][0].score, results[name][1].score
    p_value = float(results[name][1].p_value)

    metric = test.metrics[name]
    stats_a = np.array(test._baseline_info[name][0], dtype="float32")
    stats_b = np.array(metric._extract_corpus_statistics(list(system_b), refs), dtype="float32")
    # The same index matrix sacrebleu's _paired_bs_test draws for this seed.
    idxs = np.random.default_rng(seed).choice(len(system_b), size=(resamples, len(system_b)), replace=True)
    deltas = np.array([
        metric._compute_score_from_stats(b.sum(0)).score - metric._compute_score_from_stats(a.sum(0)).score
        for a, b in zip(stats_a[idxs], stats_b[idxs], strict=True)
    ])
    if np.array_equal(stats_a, stats_b):
        p_value = 1.0
    low, high = np.percentile(deltas, [2.5, 97.5])
    return Comparison(float(score_b - score_a), float(low), float(high), p_value, p_value < significance_level)


def paired_bootstrap_mean(scores_a: np.ndarray, scores_b: np.ndarray, resamples: int, seed: int,
                          significance_level: float = 0.05) -> Comparison:
    """Paired bootstrap of a mean of per-sample scores (in points): delta, 95% interval, p-value.

    The p-value is the two-sided shift test: the share of resampled deltas, centred on the observed
    delta, at least as far from 0 as the observed delta ((count + 1) / (resamples + 1)). Equal
    per-sample scores give delta 0 and p = 1.
    """
    diffs = (np.asarray(scores_b, dtype=np.float64) - np.asarray(scores_a, dtype=np.float64)) * 100.0
    observed = float(diffs.mean())
    idxs = np.random.default_rng(seed).choice(len(diffs), size=(resamples, len(diffs)), replace=True)
    deltas = diffs[idxs].mean(axis=1)
    extreme = int(np.sum(np.abs(deltas - observed) >= abs(observed) - 1e-12))
    p_value = (extreme + 1) / (resamples + 1)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return Comparison(observed, float(low), float(high), float(p_value), p_value < significance_level)


def bootstrap_rouge_l_delta(references: Sequence[str], system_a: Sequence[str], system_b: Sequence[str],
                            resamples: int = 1000, seed: int = 12345,
                            significance_level: float = 0.05) -> Comparison:
    """ROUGE-L(system_b) - ROUGE-L(system_a) in points, by paired bootstrap over samples."""
    _check_paired(references, system_a, system_b, resamples)
    a = rouge_per_sample(references, system_a, ("rougeL",))["rougeL"]
    b = rouge_per_sample(references, system_b, ("rougeL",))["rougeL"]
    return paired_bootstrap_mean(a, b, resamples, seed, significance_level)


def bootstrap_exact_match_delta(references: Sequence[str], system_a: Sequence[str], system_b: Sequence[str],
                                resamples: int = 1000, seed: int = 12345,
                                significance_level: float = 0.05) -> Comparison:
    """Exact match(system_b) - exact match(system_a) in points, by paired bootstrap over samples."""
    _check_paired(references, system_a, system_b, resamples)
    a = exact_match_per_sample(references, system_a)
    b = exact_match_per_sample(references, system_b)
    return paired_bootstrap_mean(a, b, resamples, seed, significance_level)
