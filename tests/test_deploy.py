"""Using a trained run: make predict (flat folder, labelled folder, CSV), make export (ONNX + torch.export) checked in
onnxruntime against the run's own fp32 model, weights-only loading, and clear errors for what is not a run."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmtransfer.cli.config import compose_config
from fmtransfer.cli.export import main as export_main
from fmtransfer.cli.predict import main as predict_main
from fmtransfer.deploy import RunDirError, build_classifier, load_run
from fmtransfer.regimes import run_regime

from .conftest import write_image_folder


def _last_line(capsys, prefix: str) -> Path:
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(prefix), lines[-5:]
    return Path(lines[-1].removeprefix(prefix))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A frozen selective (Head2Toe) run on a real-digits ImageFolder (train/validation/test), 40 px: its 20x20 and
    10x10 maps pooled to the cache's 8x8, and its 5x5 and 3x3 maps to the head's 2x2 grids, do not divide evenly
    (what the exported graph must reproduce)."""
    tmp = tmp_path_factory.mktemp("deploy")
    data = write_image_folder(tmp / "digits", {"train": 8, "val": 4, "test": 4})
    cfg = compose_config(
        [
            f"data.path={data}",
            f"paths.data_dir={tmp / 'data'}",
            f"paths.log_dir={tmp / 'logs'}",
            "data.image_size=40",
            "head=selective",
            "head.epochs=5",
            "trainer.progress_bar=false",
        ]
    )
    run_dir = tmp / "run"
    run_regime(cfg, run_dir)
    flat = tmp / "flat"
    flat.mkdir()
    for i, png in enumerate(sorted((data / "test").rglob("*.png"))[:10]):
        shutil.copy(png, flat / f"new_{i:02d}.png")
    return run_dir, data, flat, tmp


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_predict_on_a_flat_folder_reuses_the_cache_and_matches_the_model(folder_run, capsys):
    run_dir, _, flat, tmp = folder_run
    out = tmp / "pred" / "predictions.csv"
    predict_main([f"run={run_dir}", f"data.path={flat}", f"out={out}"])
    assert _last_line(capsys, "predictions: ") == out.resolve()
    rows = _rows(out)
    run = load_run(run_dir)
    assert list(rows[0]) == ["path", "pred", *(f"prob_{c}" for c in run.class_names)]  # no label: unlabelled
    assert [Path(r["path"]).name for r in rows] == [f"new_{i:02d}.png" for i in range(10)]
    # The same probabilities as the rebuilt model (backbone, the cache's pooling and dtype, head) on the images.
    from fmtransfer.backbone import build_eval_transform

    tf = build_eval_transform(run.data_config)
    x = torch.stack([tf(Image.open(r["path"]).convert("RGB")) for r in rows])
    with torch.no_grad():
        probs = build_classifier(run)(x).softmax(-1).numpy()
    written = np.array([[float(r[f"prob_{c}"]) for c in run.class_names] for r in rows])
    assert np.abs(probs - written).max() < 1e-4
    assert [r["pred"] for r in rows] == [run.class_names[i] for i in probs.argmax(1)]
    # A second prediction of the same images reads their maps from the cache.
    predict_main([f"run={run_dir}", f"data.path={flat}", f"out={out}"])
    assert "hit: reusing" in capsys.readouterr().out


def test_predict_on_labelled_folder_and_csv_adds_the_label(folder_run, capsys):
    run_dir, data, _, tmp = folder_run
    predict_main([f"run={run_dir}", f"data.path={data}", f"out={tmp / 'lab.csv'}"])
    rows = _rows(_last_line(capsys, "predictions: "))
    assert rows[0].keys() >= {"path", "pred", "label"} and len(rows) == 3 * (8 + 4 + 4)
    assert {r["label"] for r in rows} == {"digit0", "digit1", "digit2"}
    assert sum(r["label"] == r["pred"] for r in rows) / len(rows) > 0.5  # real digits, trained head
    # A CSV naming images and labels (train split only) gives the same predictions for those images.
    csv_path = tmp / "labels.csv"
    images = sorted((data / "train").rglob("*.png"))
    csv_path.write_text("image,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images))
    predict_main([f"run={run_dir}", f"data.path={csv_path}", f"out={tmp / 'csv.csv'}"])
    from_csv = {Path(r["path"]).name: r for r in _rows(_last_line(capsys, "predictions: "))}
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(from_csv) == len(images)
    assert all(
        from_csv[n]["pred"] == by_name[n]["pred"] and from_csv[n]["label"] == by_name[n]["label"] for n in from_csv
    )
    # A CSV with its own column names, named as make train names them (data.csv_columns.*).
    renamed = tmp / "renamed.csv"
    renamed.write_text(csv_path.read_text().replace("image,label", "file,digit", 1))
    columns = ["data.csv_columns.image=file", "data.csv_columns.label=digit"]
    predict_main([f"run={run_dir}", f"data.path={renamed}", *columns, f"out={tmp / 'renamed-pred.csv'}"])
    assert _rows(_last_line(capsys, "predictions: ")) == list(_rows(tmp / "csv.csv"))


def test_export_runs_in_onnxruntime_like_the_fp32_model(folder_run, capsys):
    import onnxruntime as ort
    import timm.data

    run_dir, _, flat, tmp = folder_run
    export_main([f"run={run_dir}", f"out={tmp / 'export'}"])
    out = _last_line(capsys, "export dir: ")
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model.pt2", "labels.json", "preprocessing.json"}
    labels = json.loads((out / "labels.json").read_text())
    pre = json.loads((out / "preprocessing.json").read_text())
    assert labels == load_run(run_dir).class_names
    assert set(pre["timm_transform"]) == {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}
    assert "composited onto white" in pre["to_rgb"]
    source = json.loads((out / "source.json").read_text())
    assert source["run_precision"] == load_run(run_dir).precision and source["graph_precision"] == "float32"
    # Preprocess with timm from preprocessing.json alone, as a deployment would.
    tf = timm.data.create_transform(**pre["timm_transform"], is_training=False)
    files = sorted(flat.iterdir())
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    session = ort.InferenceSession(str(out / "model.onnx"))
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        reference = build_classifier(load_run(run_dir), run_precision=False)(x).numpy()
    assert np.abs(logits - reference).max() <= 1e-3
    predict_main([f"run={run_dir}", f"data.path={flat}", f"out={tmp / 'for-export.csv'}"])
    rows = _rows(_last_line(capsys, "predictions: "))
    assert [labels[i] for i in logits.argmax(1)] == [r["pred"] for r in rows]
    program = torch.export.load(out / "model.pt2")
    assert np.abs(program.module()(x[:3]).detach().numpy() - reference[:3]).max() <= 1e-3  # any batch size


def test_live_regimes_rebuild_to_their_recorded_test_predictions(tmp_path, tiny_overrides):
    """partial (cached prefix, fixed BatchNorm statistics) and scratch, rebuilt from their run dirs, give the
    test probabilities the runs recorded."""
    from fmtransfer.backbone import build_eval_transform
    from fmtransfer.data.images import to_rgb
    from fmtransfer.regimes import load_data

    common = [*tiny_overrides, "data.shots_per_class=3"]
    for regime in (
        ["regime=partial", "regime.epochs=2", "regime.min_steps=2", "regime.lp_init=false"],
        ["regime=scratch", "regime.epochs=1", "regime.min_steps=2", "regime.image_size=32"],
    ):
        cfg = compose_config([*common, *regime])
        run_dir = tmp_path / regime[0].split("=")[1]
        run_regime(cfg, run_dir)
        run = load_run(run_dir)
        test = load_data(run.cfg).splits["test"]
        tf = build_eval_transform(run.data_config)
        x = torch.stack([tf(to_rgb(im)) for im in test["image"]])
        with torch.no_grad():
            probs = torch.cat([build_classifier(run)(x[i : i + 64]).softmax(-1) for i in range(0, len(x), 64)])
        recorded = np.array(
            [[float(r[f"prob_{c}"]) for c in run.class_names] for r in _rows(run_dir / "test_predictions.csv")]
        )
        assert np.abs(probs.numpy() - recorded).max() < 1e-4, regime[0]


def test_a_lora_run_predicts_and_exports_merged_plain_weights(tmp_path, tiny_overrides):
    """A LoRA run (peft adapters on the 1x1 convolutions) rebuilt from its run dir gives the test probabilities the
    run recorded (the model make predict runs); in float32, the model make export writes, its adapters are merged
    into plain weights with the adapted model's logits within 1e-4 (the ONNX conversion of plain layers: the export
    test)."""
    from fmtransfer.backbone import build_eval_transform
    from fmtransfer.data.images import to_rgb
    from fmtransfer.deploy.model import lora_model
    from fmtransfer.regimes import load_data

    overrides = ["regime=lora", "regime.epochs=2", "regime.min_steps=4", "regime.image_size=32"]
    run_dir = tmp_path / "lora"
    metrics = run_regime(compose_config([*tiny_overrides, "data.shots_per_class=3", *overrides]), run_dir)
    assert metrics["tuned"]["what"] == "LoRA rank 8 on 32 layers" and metrics["epochs"] > 0
    run = load_run(run_dir)
    images = load_data(run.cfg).splits["test"]["image"]
    x = torch.stack([build_eval_transform(run.data_config)(to_rgb(im)) for im in images])
    with torch.no_grad():
        probs = build_classifier(run)(x).softmax(-1).numpy()
        merged = build_classifier(run, run_precision=False)
        adapted = lora_model(run, run.state_dict()).eval()
        assert any("lora_B" in n for n, _ in adapted.named_parameters())
        assert not any("lora" in n for n, _ in merged.named_parameters())
        # The merge is exact arithmetic (in float64; in float32 the changed summation order alone moves this
        # 32 px model's logits by up to ~2e-4).
        x64 = x[:32].double()
        assert np.abs(merged.double()(x64).numpy() - adapted.double()(x64).numpy()).max() < 1e-4
    recorded = [[float(r[f"prob_{c}"]) for c in run.class_names] for r in _rows(run_dir / "test_predictions.csv")]
    assert np.abs(probs - np.array(recorded)).max() < 1e-4


class _RunsCode:
    """Unpickling this runs ``open(path, 'w')``: what a malicious checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_not_unpickled(folder_run, tmp_path):
    run_dir, *_ = folder_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    run = load_run(copy)
    marker = tmp_path / "pwned"
    checkpoint = run.checkpoint_path()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["evil"] = _RunsCode(str(marker))
    with checkpoint.open("wb") as f:
        pickle.dump(state, f)  # torch.load reads plain pickles too
    with pytest.raises(RunDirError, match="holds more than weights"):
        build_classifier(run)
    assert not marker.exists(), "the crafted object was unpickled"


def test_what_is_not_a_usable_run_dir_is_named(folder_run, tmp_path, capsys):
    run_dir, _, flat, _ = folder_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.yaml", unfinished / "config.yaml")
    cases = [
        ([f"run={tmp_path / 'nope'}", f"data.path={flat}"], "no such directory"),
        ([f"run={tmp_path}", f"data.path={flat}"], "not a run dir (no config.yaml)"),
        ([f"run={unfinished}", f"data.path={flat}"], "has not finished"),
        ([f"run={run_dir}"], "missing data.path=..."),
        ([f"run={run_dir}", f"data.path={flat}", "batch=3"], "expected one of"),
        ([f"run={run_dir}", f"data.path={tmp_path / 'missing.csv'}"], "missing.csv"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            predict_main(args)
        assert exc.value.code == 2 and message in capsys.readouterr().err, (args, message)
    with pytest.raises(SystemExit):
        export_main([f"run={tmp_path / 'nope'}"])
    assert "no such directory" in capsys.readouterr().err
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text(f"image,label\n{flat / 'new_00.png'},digit0\n{tmp_path / 'gone.png'},digit1\n")
    with pytest.raises(SystemExit):
        predict_main([f"run={run_dir}", f"data.path={bad_csv}"])
    assert "gone.png" in capsys.readouterr().err


def test_predict_reproduces_a_run_extracted_and_trained_in_bf16(tmp_path, capsys):
    """A frozen run whose maps were extracted (and head trained) in bf16, as on GPUs and CPUs with native bf16:
    make predict computes as the run did, so it gives the run's own test predictions (32 px)."""
    from datasets import Image as ImageFeature

    from fmtransfer.regimes import load_data

    data = write_image_folder(tmp_path / "digits", {"train": 8, "val": 4, "test": 12})
    overrides = [f"data.path={data}", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
    overrides += ["data.image_size=32", "head.epochs=20", "trainer.precision=bf16-mixed", "trainer.progress_bar=false"]
    run_dir = tmp_path / "run"
    run_regime(compose_config(overrides), run_dir)
    run = load_run(run_dir)
    assert run.precision == {"training": "bf16-mixed", "extraction": "bf16-mixed"}
    test = load_data(run.cfg).splits["test"].cast_column("image", ImageFeature(decode=False))
    listed = tmp_path / "test.csv"
    names = run.class_names
    rows = zip(test["image"], test["label"], strict=True)
    listed.write_text("image,label\n" + "".join(f"{im['path']},{names[y]}\n" for im, y in rows))
    predict_main([f"run={run_dir}", f"data.path={listed}", f"out={tmp_path / 'pred.csv'}"])
    predicted = _rows(_last_line(capsys, "predictions: "))
    recorded = _rows(run_dir / "test_predictions.csv")
    assert len(predicted) == len(recorded) == 36
    pairs = list(zip(predicted, recorded, strict=True))
    gap = max(abs(float(p[f"prob_{c}"]) - float(r[f"prob_{c}"])) for p, r in pairs for c in names)
    same = np.mean([p["pred"] == r["pred"] for p, r in pairs])
    assert same >= 0.99 and gap <= 0.02, (same, gap)
