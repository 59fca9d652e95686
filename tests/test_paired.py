"""Per-image test statistics against independent implementations (scipy, scikit-learn, torchmetrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score
from torchmetrics.classification import MulticlassF1Score, MulticlassRecall

from fmtransfer.report.paired import bootstrap_interval, metric_value, paired_difference

RNG = np.random.default_rng(7)
LABELS = RNG.integers(0, 4, 300)
GOOD = np.where(RNG.random(300) < 0.85, LABELS, RNG.integers(0, 4, 300))
# Mostly GOOD's predictions with more errors: hard images are hard for both, as for two regimes on one test split.
BAD = np.where(RNG.random(300) < 0.80, GOOD, RNG.integers(0, 4, 300))


@pytest.mark.parametrize("preds", [GOOD, BAD, np.zeros(300, dtype=int)])  # the last predicts one class only
def test_metrics_match_sklearn_and_torchmetrics(preds):
    assert metric_value("acc", LABELS, preds, 4) == pytest.approx(np.mean(preds == LABELS))
    assert metric_value("balanced_acc", LABELS, preds, 4) == pytest.approx(balanced_accuracy_score(LABELS, preds))
    assert metric_value("f1_macro", LABELS, preds, 4) == pytest.approx(f1_score(LABELS, preds, average="macro"))
    t, p = torch.from_numpy(LABELS), torch.from_numpy(preds)
    assert metric_value("f1_macro", LABELS, preds, 4) == pytest.approx(
        float(MulticlassF1Score(4, average="macro")(p, t)), abs=1e-6
    )
    assert metric_value("balanced_acc", LABELS, preds, 4) == pytest.approx(
        float(MulticlassRecall(4, average="macro")(p, t)), abs=1e-6
    )


def test_bootstrap_interval_matches_scipy():
    ours = bootstrap_interval("acc", LABELS, GOOD[None], 4, resamples=4000)
    correct = (LABELS == GOOD).astype(float)
    ref = stats.bootstrap((correct,), np.mean, n_resamples=4000, method="percentile", random_state=1)
    assert ours["mean"] == pytest.approx(correct.mean())
    assert ours["ci95"] == pytest.approx(list(ref.confidence_interval), abs=0.01)
    assert ours["se"] == pytest.approx(ref.standard_error, rel=0.1)


def test_paired_difference_matches_scipy_and_pairing_narrows_the_interval():
    ours = paired_difference("acc", LABELS, GOOD[None], BAD[None], 4, resamples=4000)
    a, b = (LABELS == GOOD).astype(float), (LABELS == BAD).astype(float)
    ref = stats.bootstrap(
        (a, b), lambda x, y: np.mean(x) - np.mean(y), paired=True, n_resamples=4000, method="percentile", random_state=1
    )
    assert ours["diff"] == pytest.approx(a.mean() - b.mean())
    assert ours["ci95"] == pytest.approx(list(ref.confidence_interval), abs=0.01)
    unpaired = stats.bootstrap(
        (a, b),
        lambda x, y: np.mean(x) - np.mean(y),
        paired=False,
        n_resamples=4000,
        method="percentile",
        random_state=1,
    )
    paired_width = ours["ci95"][1] - ours["ci95"][0]
    assert paired_width < unpaired.confidence_interval.high - unpaired.confidence_interval.low
    # A real gap of ~15 points on 300 images: p agrees with McNemar's exact test on the discordant pairs (both tiny).
    discordant_a, discordant_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    mcnemar = stats.binomtest(discordant_a, discordant_a + discordant_b, 0.5).pvalue
    assert ours["p_value"] < 0.01 and mcnemar < 0.01


def test_no_difference_gives_a_large_p_value_and_an_interval_around_zero():
    same = paired_difference("acc", LABELS, GOOD[None], GOOD[None], 4)
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and same["p_value"] == 1.0
    shuffled = np.roll(GOOD, 1)  # different images wrong, similar count
    d = paired_difference("balanced_acc", LABELS, GOOD[None], np.stack([GOOD, shuffled]), 4, resamples=500)
    assert d["ci95"][0] < d["diff"] < d["ci95"][1]
