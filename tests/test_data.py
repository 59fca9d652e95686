"""Data: every source kind, split handling (given vs made), k-shot selection, colour modes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

from fmtransfer.data import prepare_data, split_fingerprint, to_rgb
from fmtransfer.data.sources import detect_source
from fmtransfer.errors import ConfigError, DataError

from .conftest import digits_images, shared_dataset, write_image_folder


def test_embedded_digits_get_stratified_seeded_splits():
    data = prepare_data("sklearn:digits")
    sizes = data.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == round(1797 * 0.2)
    assert data.split_source["train"].startswith("given")
    assert data.split_source["test"].startswith("made from train: 20% stratified, seed 0")
    test_counts = np.bincount(data.splits["test"]["label"], minlength=10)
    assert test_counts.min() >= 34 and test_counts.max() <= 38, "test split must be stratified"
    again = prepare_data("sklearn:digits")
    assert split_fingerprint(again.splits["test"]) == split_fingerprint(data.splits["test"])
    other = prepare_data("sklearn:digits", split_seed=1)
    assert split_fingerprint(other.splits["test"]) != split_fingerprint(data.splits["test"])


def test_image_folder_with_given_train_and_val(tmp_path):
    root = write_image_folder(tmp_path / "folder", {"train": 8, "val": 4})
    data = prepare_data(str(root), val_fraction=0.2, test_fraction=0.25)
    assert data.source.name == "imagefolder"
    assert data.split_source["validation"] == "given"
    assert data.split_source["test"].startswith("made from train")
    assert data.sizes() == {"train": 18, "validation": 12, "test": 6}
    assert data.class_names == ["digit0", "digit1", "digit2"]


def test_rename_splits_uses_a_held_out_folder_as_test(tmp_path):
    root = write_image_folder(tmp_path / "folder", {"train": 10, "val": 4})
    data = prepare_data(str(root), rename={"validation": "test"}, val_fraction=0.2)
    assert data.split_source["test"] == "given"
    assert data.sizes()["test"] == 12
    assert data.split_source["validation"].startswith("made from train")
    with pytest.raises(ConfigError, match=r"data\.rename_splits names"):
        prepare_data(str(root), rename={"nosuch": "test"})


def test_parquet_directory_with_all_three_splits(tmp_path):
    images = digits_images(n_per_class=6, classes=2)
    from datasets import ClassLabel, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["zero", "one"])})
    for split, sl in (("train", slice(0, 4)), ("val", slice(4, 5)), ("test", slice(5, 6))):
        rows = [im for k, im in enumerate(images) if sl.start <= k % 6 < sl.stop]
        ds = Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]}, features=features)
        ds.to_parquet(tmp_path / f"{split}.parquet")
    data = prepare_data(str(tmp_path))
    assert data.source.name == "parquet"
    assert data.split_source == {"train": "given", "validation": "given", "test": "given"}
    assert data.sizes() == {"train": 8, "validation": 2, "test": 2}
    assert data.class_names == ["zero", "one"]


def test_shots_per_class_subsamples_train_only():
    data = prepare_data("sklearn:digits", shots_per_class=5, shots_seed=3)
    labels = np.asarray(data.splits["train"]["label"])
    assert np.bincount(labels).tolist() == [5] * 10
    assert data.sizes()["test"] == 359
    again = prepare_data("sklearn:digits", shots_per_class=5, shots_seed=3)
    assert split_fingerprint(again.splits["train"]) == split_fingerprint(data.splits["train"])
    other = prepare_data("sklearn:digits", shots_per_class=5, shots_seed=4)
    assert split_fingerprint(other.splits["train"]) != split_fingerprint(data.splits["train"])


def test_too_many_shots_names_the_option_and_limit():
    with pytest.raises(DataError, match=r"data.shots_per_class=500.*at most \d+"):
        prepare_data("sklearn:digits", shots_per_class=500)


def test_a_class_with_one_image_cannot_be_split(tmp_path):
    root = tmp_path / "folder"
    write_image_folder(root, {"train": 6}, classes=2)
    lonely = root / "train" / "digit9"
    lonely.mkdir()
    digits_images(1, 1)[0][0].save(lonely / "only.png")
    with pytest.raises(DataError, match="single training image"):
        prepare_data(str(root))


@pytest.mark.parametrize(
    ("path", "message"),
    [("/no/such/dir", "no such file or directory"), ("./relative/missing", "no such file or directory")],
)
def test_bad_paths_are_explained(path, message):
    with pytest.raises(DataError, match=message):
        detect_source(path)


def test_hub_ids_are_recognised_without_network(tmp_path, monkeypatch):
    assert detect_source("cifar/cifar10-like").name == "hub"
    # "data/mysett" where data/ exists here is a mistyped folder, named as one, not sent to the hub.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "myset").mkdir(parents=True)
    with pytest.raises(DataError, match=r"data\.path=data/mysett: no such folder \(its parent data/ exists"):
        detect_source("data/mysett")
    assert detect_source("data/mysett", "hub").name == "hub"  # data.format=hub when it really is a hub id


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_colour_mode_becomes_rgb(mode):
    base = digits_images(1, 1)[0][0].convert("RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == base.size
    if mode == "I;16":
        assert np.asarray(out).max() == 255, "16-bit images are rescaled, not clipped"


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_hymenoptera_folder_splits_as_the_tutorial():
    root = shared_dataset("hymenoptera")
    data = prepare_data(str(root), rename={"validation": "test"}, val_fraction=0.2)
    assert data.sizes()["test"] == 153
    assert data.sizes()["train"] + data.sizes()["validation"] == 244
    assert data.class_names == ["ants", "bees"]


def test_uiuc_texture_single_folder_gets_made_splits():
    data = prepare_data(str(shared_dataset("uiuc_texture")), val_fraction=0.15, test_fraction=0.25)
    assert data.num_classes == 25
    assert data.sizes()["test"] == 250
    assert data.split_source["validation"].startswith("made from train")


def test_pneumoniamnist_parquet_splits_are_given():
    data = prepare_data(str(shared_dataset("pneumoniamnist")))
    assert data.sizes() == {"train": 4708, "validation": 524, "test": 624}
    assert data.class_names == ["normal", "pneumonia"]


def _csv_of(folder, csv_path, split_column=True, image_column="image"):
    """A CSV listing ``folder``'s ImageFolder images (relative paths, sorted as the ImageFolder loader lists them)."""
    rows = [f"{image_column},label" + (",split" if split_column else "")]
    for f in sorted(folder.rglob("*.png")):
        split, label = f.parent.parent.name, f.parent.name
        rows.append(f"{f.relative_to(csv_path.parent)},{label}" + (f",{split}" if split_column else ""))
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def test_csv_labels_give_the_same_splits_and_run_as_the_image_folder(tmp_path, tiny_overrides):
    from .conftest import run_train_cli

    folder = write_image_folder(tmp_path / "folder", {"train": 12, "test": 6})
    csv_path = _csv_of(folder, tmp_path / "labels.csv")
    assert detect_source(str(csv_path)).name == "csv"
    as_csv, as_folder = prepare_data(str(csv_path)), prepare_data(str(folder))
    assert as_csv.sizes() == as_folder.sizes() and as_csv.class_names == as_folder.class_names
    for split in ("train", "validation", "test"):
        assert split_fingerprint(as_csv.splits[split]) == split_fingerprint(as_folder.splits[split])
    # The same test accuracy from make train on either form (same images, same splits, same seed).
    accs = []
    for path in (csv_path, folder):
        done = run_train_cli([*tiny_overrides, f"data.path={path}", "data.shots_per_class=null"])
        assert done.returncode == 0, done.stderr[-2000:]
        run_dir = done.stdout.strip().splitlines()[-1].removeprefix("run dir: ")
        accs.append(
            __import__("json").loads((__import__("pathlib").Path(run_dir) / "metrics.json").read_text())["test"]
        )
    assert accs[0] == accs[1]


def test_csv_problems_are_named(tmp_path):
    folder = write_image_folder(tmp_path / "folder", {"train": 3})
    good = _csv_of(folder, tmp_path / "labels.csv", split_column=False)
    renamed = _csv_of(folder, tmp_path / "renamed.csv", split_column=False, image_column="file")
    with pytest.raises(DataError, match=r"csv_columns\.image"):
        prepare_data(str(renamed))
    assert prepare_data(str(renamed), csv_columns={"image": "file"}).sizes()["train"] > 0
    (tmp_path / "missing.csv").write_text(good.read_text() + "nowhere/x.png,digit0\n")
    with pytest.raises(DataError, match=r"1 images that do not exist, e\.g\. line 11: .*nowhere/x\.png"):
        prepare_data(str(tmp_path / "missing.csv"))
    (tmp_path / "split.csv").write_text("image,label,split\n" + "\n".join(
        f"{line.split(',')[0]},{line.split(',')[1]},holdout" for line in good.read_text().splitlines()[1:]
    ))  # fmt: skip
    with pytest.raises(DataError, match="split values other than"):
        prepare_data(str(tmp_path / "split.csv"))


def test_a_folder_loaded_again_in_one_process_is_reused_until_its_files_change(tmp_path):
    """A comparison loads its dataset for every run: the same files are read once per process; an image added (or
    changed) is seen by the next load."""
    from fmtransfer.data.sources import load_image_dataset

    root = write_image_folder(tmp_path / "folder", {"train": 4, "val": 2}, classes=2)
    first, _, _ = load_image_dataset(str(root))
    again, _, _ = load_image_dataset(str(root))
    assert again is not first and again["train"] is first["train"], "the same splits, in a dict of the caller's own"
    held_out = next(k for k in again if k != "train")
    del again[held_out]  # a caller dropping a split does not drop it from the next load
    assert set(load_image_dataset(str(root))[0]) == set(first) == {"train", held_out}
    extra = root / "train" / "digit0" / "extra.png"
    Image.open(next((root / "train" / "digit0").iterdir())).save(extra)
    grown, _, _ = load_image_dataset(str(root))
    assert len(grown["train"]) == len(first["train"]) + 1


@pytest.mark.parametrize(
    "layout",
    [
        ["a/1.png", "b/2.png", "b/3.jpg", "a/.hidden.png", "a/notes.txt"],  # class folders only: all train
        [
            "train/a/1.png",
            "train/b/2.png",
            "val_2024/a/3.png",
            "val_2024/b/4.png",
            "testing/a/5.png",
            "testing/b/6.png",
        ],
        ["data/train/a/1.png", "data/train/b/2.png", "data/dev/a/3.png", "data/dev/b/4.png", "__skip/a/9.png"],
        ["a/train_1.png", "b/train_2.png", "a/test-3.png", "b/test-4.png"],  # split in the file name
    ],
)
def test_an_image_folder_reads_as_the_hugging_face_loader_reads_it(tmp_path, layout):
    """One walk gives what the Hugging Face imagefolder loader gives: the same splits, files in the same order,
    labels and class names."""
    from datasets import Image as ImageFeature

    from fmtransfer.data.sources import load_image_folder, load_image_folder_with_hf

    for k, name in enumerate(layout):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("txt"):
            (tmp_path / name).write_text("not an image")
        else:
            Image.new("RGB", (4, 4), (k * 20, 0, 0)).save(tmp_path / name)
    ours, theirs = load_image_folder(str(tmp_path)), load_image_folder_with_hf(str(tmp_path), str(tmp_path / ".hf"))
    assert list(ours) == list(theirs)
    for split in ours:
        a, b = (d[split].cast_column("image", ImageFeature(decode=False)) for d in (ours, theirs))
        assert [x["path"] for x in a["image"]] == [x["path"] for x in b["image"]], split
        assert list(a["label"]) == list(b["label"]) and a.features == b.features
