"""One selection protocol for every regime: group-aware folds, epochs from the pooled out-of-fold curve, a refit on
the folds' schedule, the paired one-SE rule, two-level test intervals and Holm's adjustment, against independent
references (statsmodels, scipy) where one exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets import Image as ImageFeature
from PIL import Image
from scipy import stats

from fmtransfer.data import CrossValidation, prepare_data
from fmtransfer.report.paired import bootstrap_interval, holm, paired_difference, paired_se
from fmtransfer.report.selection import candidate_curve
from fmtransfer.report.stats import summarise
from fmtransfer.report.verdict import verdict
from tests.conftest import digits_images


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(3)
    for p in ([0.01, 0.04, 0.03, 0.2], rng.random(7) * 0.1, [0.5], [0.001, 0.001, 0.9]):
        ref = multitest.multipletests(p, method="holm")[1]
        assert holm(list(p)) == pytest.approx(list(ref))
    assert holm([]) == []


def test_the_paired_interval_covers_a_known_difference_about_95_percent_of_the_time():
    """500 simulated test splits of 400 images; regime A is right with probability 0.80, B with 0.72, correlated
    (hard images are hard for both): the true difference is 0.08. 500 coverages have a standard error of ~1 point,
    so the 93-97 % band holds for most generator seeds (0: 91.4 %, 1-3: 95.6, 94.2, 95.4 %)."""
    rng = np.random.default_rng(1)
    labels = np.zeros(400, dtype=int)
    covered = 0
    for sim in range(500):
        u, v = rng.random(400), rng.random(400)
        a = np.where(u < 0.80, 0, 1)
        b = np.where(np.where(v < 0.5, u, rng.random(400)) < 0.72, 0, 1)
        d = paired_difference("acc", labels, a[None], b[None], 2, resamples=400, seed=sim)
        covered += d["ci95"][0] <= 0.08 <= d["ci95"][1]
    assert 0.93 <= covered / 500 <= 0.97, covered / 500


def test_the_two_level_interval_is_wider_than_the_image_level_one_when_seeds_disagree():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    # Three seeds (three k-shot subsets) with accuracies around 0.92, 0.70 and 0.81.
    preds = np.stack([np.where(rng.random(300) < q, labels, 1 - labels) for q in (0.92, 0.70, 0.81)])
    ours = bootstrap_interval("acc", labels, preds, 2, resamples=3000)
    seed_mean = (preds == labels).mean(0)
    one_level = stats.bootstrap((seed_mean,), np.mean, n_resamples=3000, method="percentile", random_state=0)
    assert ours["mean"] == pytest.approx(seed_mean.mean())
    width = ours["ci95"][1] - ours["ci95"][0]
    ref = one_level.confidence_interval.high - one_level.confidence_interval.low
    assert width > 1.5 * ref, (width, ref)
    # Seeds that agree: the two levels add nothing.
    same = bootstrap_interval("acc", labels, np.stack([preds[0]] * 3), 2, resamples=3000)
    assert same["ci95"][1] - same["ci95"][0] == pytest.approx(
        bootstrap_interval("acc", labels, preds[:1], 2, resamples=3000)["ci95"][1]
        - bootstrap_interval("acc", labels, preds[:1], 2, resamples=3000)["ci95"][0],
        abs=0.02,
    )


def _row(score, cost, epochs=5.0, n=300):
    s = lambda v: summarise([v] * 3, bounds=(0.0, 1.0))  # noqa: E731
    return {
        "all": {
            "val": {"acc": s(score)},
            "test": {"acc": s(score)},
            "cost_seconds": cost,
            "n_scored": n,
            "trainable_params": 1000,
            "seeds": [0, 1, 2],
            "kept_start": 0,
            "epochs": summarise([epochs] * 3),
            "image_size": [3, 224, 224],
        }
    }


def test_identical_out_of_fold_predictions_have_paired_se_0_and_the_cheaper_regime_wins():
    labels = np.array([0, 1, 2] * 100)
    rng = np.random.default_rng(2)
    preds = np.where(rng.random(300) < 0.8, labels, (labels + 1) % 3)
    rows = np.arange(300)
    oof = {r: {"rows": rows, "labels": labels, "preds": preds} for r in ("frozen", "finetune")}
    score = float((preds == labels).mean())
    v = verdict({"frozen": _row(score, 5.0), "finetune": _row(score, 50.0)}, "acc", oof=oof, num_classes=3)
    assert v["gap_se"] == {"frozen": 0.0, "finetune": 0.0} and v["winner"] == "frozen"
    assert paired_se("acc", labels, preds, preds, 3) == 0.0
    assert paired_se("f1_macro", labels, preds, preds, 3) == 0.0


def test_the_paired_se_separates_a_consistent_gap_that_the_binomial_se_would_call_noise():
    """finetune is right on every image frozen is right on, plus 6 more of 300: 2 points better. The binomial SE of a
    0.8 score on 300 images is ~2.3 points (frozen would be 'within one SE'); the paired SE of the gap ~0.8 points."""
    labels = np.zeros(300, dtype=int)
    frozen = np.where(np.arange(300) < 234, 0, 1)  # 0.78
    finetune = np.where(np.arange(300) < 240, 0, 1)  # 0.80
    rows = np.arange(300)
    oof = {"frozen": {"rows": rows, "labels": labels, "preds": frozen}}
    oof["finetune"] = {"rows": rows, "labels": labels, "preds": finetune}
    summary = {"frozen": _row(0.78, 5.0), "finetune": _row(0.80, 50.0)}
    v = verdict(summary, "acc", oof=oof, num_classes=2)
    assert v["best_selection"] == "finetune" and v["winner"] == "finetune"
    assert v["gap_se"]["frozen"] == pytest.approx(np.std(np.r_[np.zeros(294), -np.ones(6)], ddof=1) / np.sqrt(300))
    assert verdict(summary, "acc")["winner"] == "frozen", "without pairing the binomial SE calls the gap noise"


def test_the_epoch_is_the_argmin_of_the_pooled_loss_and_the_score_is_taken_there():
    rng = np.random.default_rng(4)

    def fold(n, epochs, losses):
        labels = rng.integers(0, 2, n)
        probs = []
        for loss in losses:  # probability of the true class exp(-loss) for every image
            p_true = np.exp(-loss)
            p = np.where(labels[:, None] == np.arange(2), p_true, 1 - p_true)
            probs.append(p)
        return {"epochs": np.array(epochs), "probs": np.stack(probs), "labels": labels, "rows": rng.permutation(n)}

    # Fold A (100 images) is best at epoch 4, fold B (300 images) at epoch 0; only epochs both validated count.
    a = fold(100, [0, 2, 4, 6], [0.60, 0.40, 0.20, 0.50])
    b = fold(300, [0, 2, 4, 5], [0.30, 0.35, 0.36, 0.10])
    b["rows"] = b["rows"] + 100
    curve = candidate_curve([a, b], 2)
    assert sorted(curve["loss"]) == [0, 2, 4]
    for e, (la, lb) in {0: (0.60, 0.30), 2: (0.40, 0.35), 4: (0.20, 0.36)}.items():
        assert curve["loss"][e] == pytest.approx((100 * la + 300 * lb) / 400), "fold-size-weighted mean loss"
    assert curve["epoch"] == 4 and list(curve["rows"]) == list(range(400))
    assert curve["scores"]["acc"] == pytest.approx(1.0)  # p_true > 0.5 everywhere at epoch 4


def _save_copies(root: Path) -> dict[str, list[str]]:
    """An ImageFolder of real digits with planted copies: for 6 images an exact copy and a resized near copy."""
    groups = {}
    for k, (img, cls) in enumerate(digits_images(20, 3)):
        folder = root / "train" / f"digit{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{k}.png")
        if k % 10 == 0:
            img.save(folder / f"{k}_copy.png")
            img.resize((40, 40), Image.BILINEAR).resize((32, 32), Image.BILINEAR).save(folder / f"{k}_near.png")
            groups[f"{k}"] = [f"{k}.png", f"{k}_copy.png", f"{k}_near.png"]
    return groups


def _file_names(split) -> set[str]:
    return {Path(im["path"]).name for im in split.cast_column("image", ImageFeature(decode=False))["image"]}


def test_planted_copies_in_the_pool_land_in_one_fold(tmp_path):
    groups = _save_copies(tmp_path / "images")
    common = dict(cache_dir=str(tmp_path / "hf"), val_fraction=0.2, test_fraction=0.2, split_seed=0)
    seen = {}
    for f in range(3):
        fold = prepare_data(str(tmp_path / "images"), **common, cv=CrossValidation(folds=3, fold=f))
        held, trained = (_file_names(fold.splits[s]) for s in ("validation", "train"))
        for key, members in groups.items():
            present = [m for m in members if m in held]
            if present:
                seen.setdefault(key, set()).add(f)
                in_pool = [m for m in members if m in held | trained]
                assert sorted(present) == sorted(in_pool), f"fold {f}: copies of {key} split across train/validation"
    assert seen and all(len(v) == 1 for v in seen.values())


def test_the_code_fingerprint_ignores_docstrings_and_comments_but_not_code(tmp_path):
    from fmtransfer.hashing import source_fingerprint

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text('"""Doc."""\n\n\ndef f(x):\n    """What f is."""\n    return x + 1  # why\n')
    before = source_fingerprint(pkg)
    edited = '"""Other doc."""\n\ndef f(x):\n    """Reworded."""\n    # a new comment\n    return x + 1\n'
    (pkg / "m.py").write_text(edited)
    assert source_fingerprint(pkg) == before
    (pkg / "m.py").write_text('"""Doc."""\n\n\ndef f(x):\n    """What f is."""\n    return x + 2\n')
    assert source_fingerprint(pkg) != before
