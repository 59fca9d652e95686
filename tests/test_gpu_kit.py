"""The GPU report kit: plan, compact data, archive layout, device naming; the whole sequence is rehearsed by CI
(`make gpu-report STAGE=rehearse` in .ci/run). Also the GPU bug the first lent machine found (map_shapes)."""

from __future__ import annotations

import copy
import json
import tarfile

import pytest
import torch
from PIL import Image

from fmtransfer.backbone import FeatureMapExtractor, describe_backbone, parse_levels
from fmtransfer.cache import CacheSpec, map_shapes
from fmtransfer.cli.config import compose_config
from fmtransfer.cli.gpu_report import plan_text
from fmtransfer.errors import FmtransferError
from fmtransfer.gpu_kit.device import compare_job
from fmtransfer.gpu_kit.estimate import read_loan_figures, stage_seconds
from fmtransfer.gpu_kit.pack import compact_dataset, resize_size
from fmtransfer.gpu_kit.stages import DEVICE_STAGES, EXPERIMENTS, device_command
from fmtransfer.gpu_kit.unpack import device_slug, replace_section, unpack
from fmtransfer.report.runs import planned_runs

from .conftest import ROOT, shared_dataset


def test_plan_names_every_device_stage_its_command_and_carried_data():
    plan = plan_text(estimates=False)
    for name, stage in DEVICE_STAGES.items():
        assert device_command(name) in plan
        for dataset in stage.datasets:
            assert f".gpu-kit/data/{dataset}" in plan
    assert "STAGE=pack" in plan and "STAGE=unpack FILE=" in plan and "STAGE=rehearse" in plan


def test_only_the_stage_that_runs_lora_carries_peft_s_wheels(tmp_path):
    """peft and what it imports travel in wheels-extra/, carried by the parameter-efficient stage alone (with them
    and three datasets one call would carry 78 MiB); its comparison asks for those regimes under its own name."""
    efficient = DEVICE_STAGES["hymenoptera-efficient"]
    assert efficient.packages[:3] == ("peft", "transformers", "accelerate")
    assert "wheels-extra" in efficient.carried() and efficient.datasets == ("hymenoptera",)
    assert all("wheels-extra" not in s.carried() for name, s in DEVICE_STAGES.items() if name != efficient.name)
    command = compare_job(EXPERIMENTS["hymenoptera-efficient"], tmp_path, tmp_path / "w", 60, []).command
    assert "experiment=hymenoptera" in command and "compare.name=hymenoptera-efficient" in command
    assert "compare.regimes=[frozen,bitfit,lora,surgical]" in command
    assert ".gpu-kit/wheels-extra" in plan_text(estimates=False)


def test_a_stage_s_expected_time_is_its_planned_runs_times_the_last_loan_s_seconds_per_run(tmp_path):
    log = tmp_path / "gpu-report-all-abc1234.log"
    log.write_text(
        "[gpu-report] stage all on NVIDIA H200, deadline 540 s\n"
        "[compare 1/48] frozen, seed 0, shots all: test acc 0.9281 in 4 s\n"  # before cross-validated selection
        "[report] select: finetune, shots all, candidate 1/1, fold 2/3: fold acc 0.9753 in 20 s\n"
        "[uiuc_texture] [report] final 3/8: finetune, seed 0, shots all: test acc 0.9346 in 30 s\n"
        "[uiuc_texture] [report] select: finetune, shots 5, candidate 1/2, fold 1/3: fold acc 0.9 in 40 s\n"
        "[gpu-report] bench: exit 0 after 139 s\n"
    )
    figures = read_loan_figures(log, DEVICE_STAGES["all"])  # unprefixed lines: hymenoptera, alone in group 1
    assert figures.device == "NVIDIA H200" and figures.bench_seconds == 139
    assert figures.run_seconds == {
        ("hymenoptera", "frozen"): [4.0],
        ("hymenoptera", "finetune"): [20.0],
        ("uiuc_texture", "finetune"): [30.0, 40.0],
    }
    runs = {
        "hymenoptera": {"frozen": 10, "finetune": 2},
        "uiuc_texture": {"finetune": 3},
        "pneumoniamnist": {"lora": 1},
    }
    # bench + hymenoptera (10 x 4 + 2 x 20) + uiuc_texture (3 x 35) and pneumoniamnist (not measured), whose group
    # shares the device's run slots: its runs' seconds over the slots
    assert stage_seconds(DEVICE_STAGES["all"], figures, runs, {}) == (139 + 80 + 105, ["pneumoniamnist/lora"])
    expected = 139 + 80 / 4 + 105 / 4  # pneumoniamnist ran no finetune either
    assert stage_seconds(DEVICE_STAGES["all"], figures, runs, {"lora": "finetune"}, workers=4)[0] == expected
    # The runs a comparison plans: each (regime, shots)'s candidates x folds (none at 1 shot) + a final run per seed.
    cfg = compose_config(["compare.regimes=[frozen,finetune]", "compare.shots=[1,5,all]"], name="compare")
    frozen, finetune = len(cfg.compare.sweep.frozen), len(cfg.compare.sweep.finetune)
    assert cfg.compare.selection.folds == 5 and len(cfg.compare.seeds) == 3
    assert planned_runs(cfg) == {"frozen": 3 + 2 * (frozen * 5 + 3), "finetune": 3 + 2 * (finetune * 5 + 3)}


@pytest.mark.parametrize(
    ("device", "slug"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("CPU (x86_64)", "cpu"),
    ],
)
def test_device_slug(device, slug):
    assert device_slug(device) == slug


def test_benchmark_section_is_replaced_not_duplicated():
    doc = "# Benchmarks\n\n## GPU\n\nprose\n\n## Next\n"
    once = replace_section(doc, "h100:bench", "first")
    assert once.index("first") < once.index("prose")  # under the GPU heading
    twice = replace_section(once, "h100:bench", "second")
    assert "first" not in twice and twice.count("gpu-report:h100:bench start") == 1 and "## Next" in twice


def test_compact_copy_resizes_to_the_preprocessing_size(tmp_path):
    source = shared_dataset("hymenoptera")
    short = resize_size("tf_efficientnet_lite0")
    assert short == 256  # 224 px / crop 0.875
    info = compact_dataset(source, tmp_path / "hymenoptera", short, per_class=2)
    files = sorted((tmp_path / "hymenoptera").rglob("*.jpg"))
    assert info["images"] == len(files) == 8  # train/val x ants/bees x 2
    assert {f.relative_to(tmp_path / "hymenoptera").parts[:2] for f in files} == {
        ("train", "ants"),
        ("train", "bees"),
        ("val", "ants"),
        ("val", "bees"),
    }
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and min(im.size) <= short and im.mode == "RGB"
    assert not (tmp_path / "hymenoptera.partial").exists()


def test_compact_parquet_keeps_every_label(tmp_path):
    import pyarrow.parquet as pq

    source = shared_dataset("pneumoniamnist")
    compact_dataset(source, tmp_path / "p", 256, per_class=3)
    for split in ("train", "val", "test"):
        labels = pq.read_table(tmp_path / "p" / f"{split}.parquet").column("label").to_pylist()
        assert sorted(labels) == [0, 0, 0, 1, 1, 1]


def test_missing_dataset_and_bad_archive_are_named(tmp_path):
    with pytest.raises(FmtransferError, match="is not a folder"):
        compact_dataset(tmp_path / "nope", tmp_path / "out", 256)
    with pytest.raises(FmtransferError, match="does not exist"):
        unpack(tmp_path / "missing.tar.gz", ROOT, tmp_path)
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(FmtransferError, match="not a gpu-report archive"):
        unpack(tmp_path / "junk.tar.gz", ROOT, tmp_path)
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(FmtransferError, match=r"no manifest\.json"):
        unpack(empty, ROOT, tmp_path)


def test_unpack_names_the_packed_commit_and_lays_out_reports(tmp_path):
    """An archive whose device copy had a stale .git: the packed commit is named everywhere."""
    src = tmp_path / "src" / "hymenoptera"
    src.mkdir(parents=True)
    results = {"verdict": {"winner": "frozen", "shots": "all"}, "environment": {"git_commit": "stale-dirty"},
               "summary": {"frozen": {"all": {"test": {"acc": {"mean": 0.9, "std": 0.01}}}}}}  # fmt: skip
    (src / "results.json").write_text(json.dumps(results))
    for name in ("report.md", "report.html", "config.yaml"):
        (src / name).write_text("commit stale-dirty")
    env = {"device": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "python": "3.12", "torch": "2", "timm": "1",
           "pytorch_lightning": "2", "git_commit": "stale-dirty"}  # fmt: skip
    job = {
        "command": "fmtransfer.cli.compare experiment=hymenoptera",
        "returncode": 0,
        "seconds": 200.0,
        "timed_out": False,
    }
    manifest = {"stage": "hymenoptera", "environment": env, "kit": {"commit": "abc123"}, "parallel": False,
                "wall_seconds": 210.0, "jobs": {"hymenoptera": job}}  # fmt: skip
    (tmp_path / "src" / "manifest.json").write_text(json.dumps(manifest))
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname=".")
    done = unpack(archive, ROOT, tmp_path / "dest")
    report = tmp_path / "dest" / "reports" / "hymenoptera-h100"
    assert done["device"] == "h100" and (report / "gpu-report.json").is_file()
    assert json.loads((report / "results.json").read_text())["environment"]["git_commit"] == "abc123"
    assert (report / "report.md").read_text() == "commit abc123"
    section = (tmp_path / "dest" / "docs" / "benchmarks.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in section and "3 min 20 s" in section and "frozen (0.900 ± 0.010)" in section


def test_map_shapes_probes_on_the_backbone_device():
    """The first GPU run failed here: the shape probe was a CPU tensor while the bench's model was on the GPU.
    The meta device stands in for a GPU (any device other than the CPU's)."""
    spec = describe_backbone("tf_efficientnet_lite0")
    model = spec.create()[0]
    levels = parse_levels(["level1", "pre_logits"], spec.levels)
    cache_spec = CacheSpec(tuple(levels), "float16", "none", 8)
    on_cpu = map_shapes(FeatureMapExtractor(model, levels), cache_spec, (3, 64, 64))
    elsewhere = FeatureMapExtractor(copy.deepcopy(model).to("meta"), levels)
    assert map_shapes(elsewhere, cache_spec, (3, 64, 64)) == on_cpu
    assert torch.Size(on_cpu["pre_logits"]) == torch.Size([1280])
