"""The shared fit loop: the starting weights compete in selection through trainer.validate, resumed runs keep
their start's score, callbacks from config measure the run; the Trainer, callbacks and loggers come from config."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from fmtransfer.backbone import FixedBatchNormStats
from fmtransfer.cli.config import compose_config
from fmtransfer.heads import HeadClassifier, LinearProbeHead, PooledFeatureDataset, ResidentBatches
from fmtransfer.regimes import FinetuneRegime, FrozenRegime, PartialRegime, ScratchRegime, for_run_dir
from fmtransfer.regimes.efficient import BitFitRegime, LoraRegime, SurgicalRegime
from fmtransfer.training import CachedFeatureDataModule, EpochTimer, PeakMemory, fit_select_test, instantiate_training
from fmtransfer.training.fit import START_FILE


def digits_datamodule(placement) -> CachedFeatureDataModule:
    """Real digits (scikit-learn's scans) as 64-pixel feature vectors, split 60/20/20."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.data / 16.0).astype(np.float32))
    y = torch.from_numpy(d.target.astype(np.int64))
    cut = {"train": slice(0, 600), "validation": slice(600, 800), "test": slice(800, 1000)}
    sets = {s: PooledFeatureDataset({"pixels": x[c]}, y[c]) for s, c in cut.items()}
    return CachedFeatureDataModule(
        lambda: {s: SimpleNamespace(split=s) for s in sets}, lambda s: sets[s], 64, placement, seed=0
    )


def tools_for(tmp_path: Path, *overrides: str):
    cfg = for_run_dir(compose_config([f"paths.log_dir={tmp_path / 'logs'}", *overrides]), tmp_path / "run")
    return instantiate_training(cfg)


def module(lr: float) -> HeadClassifier:
    torch.manual_seed(0)
    return HeadClassifier(LinearProbeHead({"pixels": 64}, 10), 10, lr=lr, max_epochs=3)


def test_trainer_callbacks_and_logger_come_from_config(tmp_path):
    tools = tools_for(tmp_path, "trainer.validations_per_run=2")
    trainer = tools.fit_trainer(epochs=6)
    assert trainer.max_epochs == 6 and trainer.check_val_every_n_epoch == 3
    kinds = {type(c) for c in trainer.callbacks}
    assert {ModelCheckpoint, EpochTimer, PeakMemory} <= kinds
    best = trainer.checkpoint_callback
    assert Path(best.dirpath) == tmp_path / "run" / "checkpoints" and best.monitor == "val/loss"
    assert [type(lg).__name__ for lg in trainer.loggers] == ["CSVLogger"]
    assert Path(trainer.loggers[0].log_dir) == tmp_path / "run" / "csv"
    # Each fit gets fresh callbacks: a Trainer's callbacks hold that run's state.
    assert not set(map(id, trainer.callbacks)) & set(map(id, tools.fit_trainer(epochs=6).callbacks))


def test_an_improving_run_selects_its_best_epoch_and_measures_itself(tmp_path):
    tools = tools_for(tmp_path)
    datamodule = digits_datamodule(tools.placement)
    results = fit_select_test(tools.fit_trainer(epochs=8), module(lr=0.05), datamodule, seed=0)
    assert results["selected"] == "best epoch" and results["best_checkpoint"].endswith("best.ckpt")
    assert results["test"]["acc"] > 0.8, "a linear probe on real digit pixels is far above chance (0.1)"
    assert results["epochs"] == 8 and results["seconds_per_epoch"] > 0
    assert results["peak_memory_kind"] == "cpu_heap_in_use" and results["peak_memory_bytes"] >= 0
    start = torch.load(tmp_path / "run" / "checkpoints" / START_FILE, weights_only=True)
    assert start["score"] > 2.0, "the untrained start's cross-entropy on 10 classes is about ln 10"
    # The selected epoch's metrics are those of its validation during fit (not a second pass): the same numbers a
    # fresh validation of the selected checkpoint gives.
    again = tools.fit_trainer(epochs=1).validate(
        module(lr=0.05), datamodule=datamodule, ckpt_path=results["best_checkpoint"], verbose=False
    )[0]
    assert results["val"] == {m: pytest.approx(again[f"val/{m}"], abs=1e-6) for m in results["val"]}
    assert results["seconds_per_validation"] > 0


def test_the_start_is_kept_when_no_epoch_beats_it_on_validation(tmp_path):
    tools = tools_for(tmp_path)
    datamodule = digits_datamodule(tools.placement)
    trainer = tools.fit_trainer(epochs=3)
    start_module = module(lr=0.05)
    expected = tools.fit_trainer(epochs=1).validate(start_module, datamodule=datamodule, verbose=False)[0]
    # An LR this large wrecks the probe in its first step: every epoch is worse than the start.
    wrecked = module(lr=1e4)
    results = fit_select_test(trainer, wrecked, datamodule, seed=0)
    assert results["selected"].startswith("initial state")
    store = torch.load(tmp_path / "run" / "checkpoints" / START_FILE, weights_only=True)
    assert store["score"] == pytest.approx(expected["val/loss"], rel=1e-6)
    # The start's metrics are computed by the module in the sanity check (nothing logged): Lightning's own numbers.
    assert store["metrics"] == pytest.approx(expected, rel=1e-6)
    assert results["val"]["acc"] == pytest.approx(expected["val/acc"], abs=1e-6)


def test_a_split_is_made_only_when_the_fit_reads_it_and_the_test_through_the_regimes_stream(tmp_path):
    """A cross-validation fold never reads its test split, so never holds it; a refit never validates, so never
    holds a validation set (its entry is the whole pool again); a run's one test pass reads the test split through
    the regime's stream when there is one (frozen heads: pooled from the cache chunk by chunk)."""
    tools = tools_for(tmp_path)

    def recorded(stream: bool, validates: bool = True):
        datamodule, made = digits_datamodule(tools.placement), []
        datamodule.validates = validates
        make = datamodule.make_dataset
        datamodule.make_dataset = lambda split: made.append(split) or make(split)
        if stream:
            datamodule.make_test_stream = lambda split: (
                made.append(f"{split} stream") or ResidentBatches(make(split), 64, False, "cpu")
            )
        return datamodule, made

    datamodule, made = recorded(stream=False)
    fold = fit_select_test(tools.fit_trainer(epochs=2), module(lr=0.05), datamodule, seed=0, evaluate_test=False)
    assert fold["test"] is None and made == ["train", "validation"]
    tested = {}
    for stream in (False, True):
        datamodule, made = recorded(stream)
        tested[stream] = fit_select_test(tools.fit_trainer(epochs=2), module(lr=0.05), datamodule, seed=0)["test"]
        assert made == ["train", "validation", "test stream" if stream else "test"]
    assert tested[True] == tested[False] and tested[True]["acc"] > 0.8
    datamodule, made = recorded(stream=False, validates=False)
    refit = fit_select_test(tools.fit_trainer(epochs=2, validate=False), module(lr=0.05), datamodule, 0, refit=True)
    assert made == ["train", "test"] and refit["epochs"] == 2 and refit["test"]["acc"] > 0.8


def test_a_resumed_run_compares_against_the_score_of_its_true_start(tmp_path):
    """The stored start score is what counts on resume, not a new validation of whatever the module holds."""
    tools = tools_for(tmp_path)
    datamodule = digits_datamodule(tools.placement)
    store = tmp_path / "run" / "checkpoints" / START_FILE
    store.parent.mkdir(parents=True)
    start = module(lr=0.05)
    torch.save({"score": 0.0, "state_dict": start.state_dict()}, store)  # a start no epoch can beat
    results = fit_select_test(tools.fit_trainer(epochs=3), module(lr=0.05), datamodule, seed=0)
    assert results["selected"].startswith("initial state")


class DropoutOnLevels(torch.nn.Module):
    """Dropout on every level's features: a module whose outputs differ between train and eval mode."""

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.nn.functional.dropout(v, 0.5, self.training) for k, v in inputs.items()}


def test_a_refit_scores_its_start_on_test_first_and_then_trains_as_without(tmp_path):
    """``test_start``: the starting weights' test outputs are the untrained module's own (computed here directly), and
    the pass changes nothing after it: the train mode is restored (dropout on), so training and the final test give
    exactly what a refit without it gives. 0 epochs to train: the start is the model, no second pass."""

    def refit(name: str, epochs: int = 2, **kwargs) -> dict:
        tools = tools_for(tmp_path / name)
        start = module(lr=0.05)
        start.features = DropoutOnLevels()
        trainer = tools.fit_trainer(epochs=epochs, validate=False)
        return fit_select_test(trainer, start, digits_datamodule(tools.placement), 0, refit=True, **kwargs)

    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.from_numpy((d.data[800:1000] / 16.0).astype(np.float32)), torch.from_numpy(d.target[800:1000])
    with torch.no_grad():
        expected = module(lr=0.05).head({"pixels": x}).softmax(-1)
    scored, plain = refit("scored", test_start=True), refit("plain")
    start = scored["start_test_predictions"]
    assert torch.equal(start["label"], y) and torch.allclose(start["prob"], expected, atol=1e-6)
    assert scored["start_test"]["acc"] == pytest.approx(float((expected.argmax(-1) == y).float().mean()), abs=1e-6)
    assert torch.equal(scored["test_predictions"]["prob"], plain["test_predictions"]["prob"])
    assert scored["test"] == plain["test"] and scored["test"]["acc"] > scored["start_test"]["acc"] + 0.3
    assert "start_test" not in plain and scored["phase_seconds"]["start_score"] > 0
    assert "start_test" not in refit("none", epochs=0, test_start=True)


class SlowToPrepare(FixedBatchNormStats):
    """Dropout features whose one-time preparation on their first forward (a BatchNorm fold) takes 0.4 s."""

    def __init__(self):
        super().__init__(DropoutOnLevels())

    def _fold(self, args: tuple, kwargs: dict) -> None:
        time.sleep(0.4)


def test_the_models_one_time_preparation_is_its_own_phase_not_the_passs_that_paid_it(tmp_path):
    """The first forward's preparation is ``prepare``, whichever pass paid it: a fold run's start scoring (its
    sanity check), a refit's start scoring on test, a refit's first training step; the phases still sum to the
    run's time."""

    def run(name: str, **kwargs) -> tuple[dict, float]:
        tools = tools_for(tmp_path / name)
        start = module(lr=0.05)
        start.features = SlowToPrepare()
        trainer = tools.fit_trainer(epochs=2, validate=not kwargs.get("refit"))
        began = time.perf_counter()
        results = fit_select_test(trainer, start, digits_datamodule(tools.placement), 0, **kwargs)
        return results["phase_seconds"], time.perf_counter() - began

    for name, kwargs, paid_by in [
        ("fold", {}, "start_score"),
        ("refit-scored", {"refit": True, "test_start": True}, "start_score"),
        ("refit", {"refit": True}, "fit"),
    ]:
        phases, wall = run(name, **kwargs)
        assert phases["prepare"] == pytest.approx(0.4, abs=0.05), name
        assert phases[paid_by] < 0.35 and sum(phases.values()) == pytest.approx(wall, abs=0.05), (name, phases)


@pytest.mark.parametrize(
    ("regime", "kind", "extra"),
    [
        ("frozen", FrozenRegime, {}),
        ("partial", PartialRegime, {"regime.k": 2}),
        ("finetune", FinetuneRegime, {"regime.lp_ft": False}),
        ("scratch", ScratchRegime, {"regime.image_size": 64}),
        ("bitfit", BitFitRegime, {"regime.backbone_lr": 0.0001}),
        ("lora", LoraRegime, {"regime.rank": 4}),
        ("surgical", SurgicalRegime, {"regime.block": "last"}),
    ],
)
def test_each_regime_is_a_config_group_option_instantiated_with_its_settings(regime, kind, extra):
    import hydra

    cfg = compose_config([f"regime={regime}", *(f"{k}={v}" for k, v in extra.items())])
    instance = hydra.utils.instantiate(cfg.regime, _convert_="all")
    assert isinstance(instance, kind) and instance.name == regime
    for key, value in extra.items():
        assert getattr(instance, key.split(".")[1]) == value
