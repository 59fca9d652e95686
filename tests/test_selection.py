"""Selection on every labelled image: stratified folds of the pool, fold runs that gather cached maps and leave the
test split alone, refits on the whole pool, and a case where a tiny validation split misleads and CV does not."""

from __future__ import annotations

import copy
import hashlib
import json
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from fmtransfer.cli.compare import resolve_preset
from fmtransfer.cli.config import compose_config
from fmtransfer.data import CrossValidation, prepare_data
from fmtransfer.data.splits import cv_folds_for, stratified_folds
from fmtransfer.errors import ConfigError
from fmtransfer.regimes import load_data, run_regime
from fmtransfer.regimes.run import for_run_dir
from fmtransfer.report.render import sweep_table
from fmtransfer.report.runs import run_config
from fmtransfer.report.selection import cv_settings, select, with_overrides
from fmtransfer.training.instantiate import instantiate_training


def test_stratified_folds_partition_the_pool_class_by_class():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 5)
    folds = stratified_folds(labels, 5, seed=0)
    held = np.concatenate(folds)
    assert sorted(held.tolist()) == list(range(len(labels))), "every image held out exactly once"
    for fold in folds:
        counts = np.bincount(labels[fold], minlength=3)
        assert (counts >= 1).all() and counts[0] == 2, counts  # 10 images of class 0 over 5 folds: 2 each
    assert [f.tolist() for f in stratified_folds(labels, 5, seed=0)] == [f.tolist() for f in folds]
    assert cv_folds_for(labels, 5) == 5 and cv_folds_for(labels, 10) == 5  # the smallest class has 5 images
    assert cv_folds_for(np.array([0, 0, 1]), 5) == 0  # a class with one image: nothing to hold out


def test_folds_and_refit_are_made_of_the_pool(tmp_path):
    """Real digits: a fold trains on the pool (train + validation) minus the fold and validates on the fold; under
    k-shot the pool is the k shots; a refit trains on all of it. Rows map back to their base split."""
    common = dict(cache_dir=str(tmp_path / "hf"), val_fraction=0.15, test_fraction=0.2, split_seed=0)
    plain = prepare_data("sklearn:digits", **common)
    pool = len(plain.splits["train"]) + len(plain.splits["validation"])
    fold = prepare_data("sklearn:digits", **common, cv=CrossValidation(folds=5, fold=2))
    assert len(fold.splits["train"]) + len(fold.splits["validation"]) == pool
    assert len(fold.splits["validation"]) == pytest.approx(pool / 5, abs=10)
    assert fold.splits["test"]["label"] == plain.splits["test"]["label"], "the test split is untouched"
    for split in ("train", "validation"):
        names, rows = fold.origin[split]
        for i in (0, len(rows) // 2, len(rows) - 1):
            base = plain.splits[names[i]][int(rows[i])]
            row = fold.splits[split][i]
            assert row["label"] == base["label"]
            assert np.array_equal(np.asarray(row["image"]), np.asarray(base["image"]))
    held = {(n, int(r)) for n, r in zip(*fold.origin["validation"], strict=True)}
    trained = {(n, int(r)) for n, r in zip(*fold.origin["train"], strict=True)}
    assert not held & trained and len(held | trained) == pool

    shots = prepare_data("sklearn:digits", **common, shots_per_class=4, cv=CrossValidation(folds=2, fold=0))
    assert len(shots.splits["train"]) + len(shots.splits["validation"]) == 40, "k-shot: the 4 shots, nothing else"
    assert set(shots.origin["validation"][0]) == {"train"}
    refit = prepare_data("sklearn:digits", **common, shots_per_class=4, cv=CrossValidation(refit=True, epochs=3))
    assert len(refit.splits["train"]) == 40 and "train" not in refit.origin, "a k-shot refit's train is its base"


def test_fold_run_gathers_cached_maps_and_skips_test_refit_trains_on_the_pool(tmp_path, tiny_overrides):
    """A real frozen run on a fold (and on the given validation split): scored there, test not evaluated, its maps
    gathered from the base entries (not extracted); a refit trains a fixed number of epochs on the whole pool, tests
    once, and saves weights that load with ``weights_only=True``."""
    base = compose_config([*tiny_overrides, "data.shots_per_class=6"])
    plain = run_regime(base, tmp_path / "plain")  # builds the base entries
    fold = run_regime(cv_settings(base, folds=3, fold=1), tmp_path / "fold")
    assert fold["test"] is None and fold["test_confusion"] is None
    assert fold["split_sizes"]["train"] + fold["split_sizes"]["validation"] == 60
    assert 0.0 <= fold["val"]["acc"] <= 1.0 and fold["best_epoch"] >= 0
    assert not (tmp_path / "fold" / "test_predictions.csv").exists()
    # The given validation split as the one "fold" (the validation protocol) is a selection run too.
    with pytest.raises(ConfigError, match="given_validation"):  # k shots: no given validation split in the pool
        run_regime(cv_settings(base, given_validation=True), tmp_path / "given")
    given = for_run_dir(cv_settings(base, given_validation=True), tmp_path / "given")
    assert not instantiate_training(given).evaluate_test, "a selection run, like the fold above: no test"
    assert instantiate_training(for_run_dir(base, tmp_path / "final")).evaluate_test
    entries = fold["cache"]["entries"]
    for split in ("train", "validation"):
        manifest = json.loads((Path(entries[split]) / "manifest.json").read_text())
        assert manifest["view"]["sources"] == [Path(plain["cache"]["entries"]["train"]).name], split
        assert manifest["extract_seconds"] > 0, "the gathered rows' share of the extraction time"
    assert entries["test"] == plain["cache"]["entries"]["test"]
    # The gathered rows are the base rows.
    from fmtransfer.cache import CachedSplit

    def entry(path: str) -> CachedSplit:
        return CachedSplit(Path(path), json.loads((Path(path) / "manifest.json").read_text()))

    gathered, source = entry(entries["validation"]), entry(plain["cache"]["entries"]["train"])
    rows = load_data(cv_settings(base, folds=3, fold=1)).origin["validation"][1]
    assert np.array_equal(gathered.load("pre_logits"), source.load("pre_logits")[rows])
    assert np.array_equal(gathered.labels(), source.labels()[rows])

    refit = run_regime(cv_settings(base, refit=True, epochs=2, horizon=fold["planned_epochs"]), tmp_path / "refit")
    assert refit["val"] is None and refit["epochs"] == 2 and refit["split_sizes"]["train"] == 60
    # The refit runs each of its epochs at the learning rate the fold validated (the fold's schedule, cut short).
    assert fold["planned_epochs"] > 2 and refit["planned_epochs"] == fold["planned_epochs"]
    assert logged_lrs(tmp_path / "refit") == pytest.approx(logged_lrs(tmp_path / "fold")[:2])
    # The fold kept its per-image validation probabilities at every validated epoch, the start (0) included.
    with np.load(tmp_path / "fold" / fold["val_curve"]) as curve:
        assert curve["epochs"][0] == 0 and curve["probs"].shape[1:] == (fold["split_sizes"]["validation"], 10)
        assert np.allclose(curve["probs"].sum(-1), 1.0, atol=1e-4)
    assert refit["test"]["acc"] > 0.3, "6 shots of real digits beat chance (0.1)"
    state = torch.load(refit["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("head.") for k in state)


def logged_lrs(run_dir: Path) -> list[float]:
    """The learning rate of each training epoch, from a run's CSV log."""
    import csv

    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return [float(r["train/lr"]) for r in rows if r.get("train/lr")]


def _content_key(image) -> int:
    return int(hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:8], 16)


class FixedPredictions:
    """The run scheduler's interface with no training: each run's record is per-image probabilities at epoch 0
    (uniform) and epoch 3 (0.9 on the predicted class), in validation order, with the rows' pool indices, as the fit
    loop writes them; ``right(lr, key)`` says whether the candidate with ``head.lr`` lr is right on the image with
    content key ``key`` (a wrong prediction is the next class). Records each run's label in submission order."""

    def __init__(self, right):
        self.right, self.labels = right, []

    def submit(self, label, run_cfg, run_dir) -> Future:
        self.labels.append(label)
        data = load_data(run_cfg)
        val = data.splits["validation"]
        labels = np.asarray(val["label"])
        correct = np.array([self.right(float(run_cfg.head.lr), _content_key(im)) for im in val["image"]])
        pred = np.where(correct, labels, (labels + 1) % 10)
        trained = np.full((len(val), 10), 0.1 / 9)
        trained[np.arange(len(val)), pred] = 0.9
        probs = np.stack([np.full((len(val), 10), 0.1), trained])
        rows = data.validation_rows if data.validation_rows is not None else np.arange(len(val))
        run_dir.mkdir(parents=True, exist_ok=True)
        np.savez(run_dir / "val.npz", epochs=np.array([0, 3]), probs=probs, labels=labels, rows=rows)
        future = Future()
        future.set_result({"val_curve": "val.npz", "train_seconds": 1.0, "planned_epochs": 5})
        return future


def test_a_tiny_validation_split_misleads_and_cross_validation_does_not(tmp_path):
    """Two candidates with known per-image behaviour on real digits: A is right on ~90% of images, B on ~80% but on
    every image of a 14-image validation split (what a lucky candidate looks like on tiny validation). Scored on that
    split, B is chosen; cross-validated over the 1,438 pooled images, A is. The candidates' predictions are fixed
    functions of the image (no training), so the test is about selection, which is what it checks; the splits,
    folds and pooling are the product's own."""
    overrides = ["compare.seeds=[0]", "compare.shots=[all]", "data.val_fraction=0.01", f"paths.data_dir={tmp_path}"]
    cfg = resolve_preset([*overrides, "compare.sweep.frozen=[['head.lr=0.001'],['head.lr=0.002']]"])
    base = run_config(cfg, "frozen", 0, "all")
    tiny_val = {_content_key(im) for im in load_data(base).splits["validation"]["image"]}
    first_val = min(tiny_val)

    def right(candidate: float, key: int) -> bool:
        if candidate == 0.001:  # A: ~90% right, and wrong on one validation image
            return key % 10 != 0 and key != first_val
        return key in tiny_val or key % 5 != 0  # B: ~80% right, every validation image right

    tiny_cfg = copy.deepcopy(cfg)
    tiny_cfg.compare.selection.min_scored = 0
    on_tiny = select(tiny_cfg, "frozen", "all", tmp_path / "tiny", FixedPredictions(right), base)
    assert on_tiny.protocol == "validation" and on_tiny.folds == 1 and on_tiny.n_scored == 14
    assert on_tiny.overrides == ["head.lr=0.002"], "the tiny split picks the lucky candidate"
    cv = select(cfg, "frozen", "all", tmp_path / "cv", FixedPredictions(right), base)
    assert cv.protocol == "cv" and cv.folds == 3 and cv.n_scored == 1438 and cv.n_scored >= 200
    assert cv.overrides == ["head.lr=0.001"], "cross-validation over the pool picks the better candidate"
    a, b = (c["score"] for c in cv.candidates)
    assert 0.85 < a < 0.95 and 0.75 < b < 0.85 and cv.epochs == 3 and cv.horizon == 5 and not cv.kept_start
    with np.load(cv.oof) as oof:  # the chosen candidate's pooled out-of-fold predictions, every pooled image once
        assert sorted(oof["rows"].tolist()) == list(range(1438))
        assert np.mean(oof["probs"].argmax(1) == oof["labels"]) == pytest.approx(a)
    # Each candidate against the chosen one on the same pooled images: the difference and its paired SE.
    with np.load(cv.candidates[0]["oof"]) as za, np.load(cv.candidates[1]["oof"]) as zb:
        assert np.array_equal(za["rows"], zb["rows"])
        d = (zb["probs"].argmax(1) == zb["labels"]).astype(float) - (za["probs"].argmax(1) == za["labels"])
    assert cv.candidates[0]["vs_chosen"] == {"diff": 0.0, "se": 0.0}
    assert cv.candidates[1]["vs_chosen"]["diff"] == pytest.approx(b - a, abs=1e-6)
    assert cv.candidates[1]["vs_chosen"]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), abs=1e-6)


def test_a_race_drops_after_the_first_fold_only_a_candidate_clearly_behind(tmp_path):
    """Three candidates with fixed per-image behaviour on real digits: A and C right on ~90% of images (on different
    ones), B on ~80%. With the race on, every candidate's first fold runs first; B, about 10 points behind on its
    ~480 images (several paired SEs), runs no other fold and is listed as dropped, with its first-fold score, epoch
    and paired difference from the best there (checked against numpy on the fold's predictions); A and C, level,
    run every fold and are scored as without a race."""
    sweep = "compare.sweep.frozen=[['head.lr=0.001'],['head.lr=0.002'],['head.lr=0.003']]"
    overrides = ["compare.seeds=[0]", "compare.shots=[all]", "data.val_fraction=0.01", f"paths.data_dir={tmp_path}"]
    cfg = resolve_preset([*overrides, sweep, "compare.selection.race=[frozen]"])
    base = run_config(cfg, "frozen", 0, "all")

    def right(candidate: float, key: int) -> bool:
        return {0.001: key % 10 != 0, 0.002: key % 5 != 0, 0.003: key % 10 != 1}[candidate]

    scheduler = FixedPredictions(right)
    sel = select(cfg, "frozen", "all", tmp_path / "race", scheduler, base)
    assert [label.split(", ", 2)[-1] for label in scheduler.labels[:3]] == [
        f"candidate {c}/3, fold 1/3" for c in (1, 2, 3)
    ], "the first fold of every candidate runs first"
    assert len(scheduler.labels) == 7 and not any("candidate 2/3, fold" in s for s in scheduler.labels[3:])
    a, b, c = sel.candidates
    assert "dropped" not in a and "dropped" not in c and len(a["run_dirs"]) == len(c["run_dirs"]) == 3
    assert sel.overrides in (a["overrides"], c["overrides"]) and sel.n_scored == 1438 and sel.seconds == 7.0
    first = {}
    for i in range(3):
        with np.load(tmp_path / "race" / f"candidate{i}-fold0" / "val.npz") as z:
            first[i] = z["probs"][1].argmax(1) == z["labels"]
    best = max((0, 2), key=lambda i: first[i].mean())
    d = first[1].astype(float) - first[best]
    assert b["dropped"] == {
        "after_folds": 1,
        "score": pytest.approx(first[1].mean(), abs=1e-6),
        "best_score": pytest.approx(first[best].mean(), abs=1e-6),
        "diff": pytest.approx(d.mean(), abs=1e-6),
        "se": pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), abs=1e-6),
        "epoch": 3,
    }
    assert -d.mean() > 2 * b["dropped"]["se"] and b["run_dirs"] == [str(tmp_path / "race" / "candidate1-fold0")]
    rows = sweep_table({"runs": [{"regime": "frozen", "shots_per_class": "all", "selection": sel.as_record()}]}, "all")
    assert rows[2][2].startswith("dropped after fold 1") and rows[2][4].startswith(f"fold 1: {d.mean():+.3f}")


def test_a_sweep_override_of_an_unknown_setting_is_a_config_error():
    cfg = resolve_preset(["compare.preset=cpu"])
    with pytest.raises(ConfigError, match=r"head\.lrr"):
        with_overrides(run_config(cfg, "frozen", 0, "all"), ["head.lrr=0.1"])
    assert with_overrides(run_config(cfg, "partial", 0, "all"), ["regime.k=2"]).regime.k == 2
