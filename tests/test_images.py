"""Bring your own images: a folder of class folders (mixed sizes and modes, a corrupt and a
truncated file) through decoding, extraction, both search phases, the final model and the report."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from search import images
from search.data import load_data
from search.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
CLASSES = ("cats", "dogs", "zebras")  # three classes, alphabetical = ids 0, 1, 2
MODES = ("RGB", "L", "RGBA", "P")
SIZES = ((20, 30), (40, 40), (64, 48), (32, 32))


def make_folder(root: Path, per_class: int = 14, seed: int = 0) -> Path:
    """``root/<class>/`` images whose colour depends on the class, in several sizes and modes."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = SIZES[i % len(SIZES)]
            base = np.array([c * 110, 220 - c * 100, (c * 70) % 256])
            pixels = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            mode = MODES[i % len(MODES)]
            img = Image.fromarray(pixels).convert(mode)
            img.save(folder / f"{i:03d}.{'jpg' if mode in ('RGB', 'L') else 'png'}")  # JPEG has no alpha
    (root / CLASSES[0] / "notes.txt").write_text("not an image, and not an image extension: ignored")
    (root / CLASSES[1] / "broken.jpg").write_bytes(b"this is not a JPEG")
    good = (root / CLASSES[2] / "002.png").read_bytes()
    (root / CLASSES[2] / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("own") / "photos")


def test_folder_decoded_once_to_one_size_with_corrupt_files_skipped(folder, tmp_path):
    data = images.read_folder(folder, image_size=32, cache_root=tmp_path, progress=False)
    assert data.class_names == CLASSES
    assert len(data.skipped) == 2 and any("broken.jpg" in s for s in data.skipped)
    assert any("truncated.png" in s for s in data.skipped)
    assert data.x_train.shape[1:] == (32, 32, 3) and data.x_train.dtype == np.uint8
    n = len(data.y_train) + len(data.y_test)
    assert n == 3 * 14, "every decodable image kept once"
    assert data.carved_test and np.all(np.bincount(data.y_test, minlength=3) >= 2)
    assert len(set(data.y_train[:6].tolist())) > 1, "shuffled: a prefix (--limit) mixes the classes"
    # colour encodes the class: decoding kept it (red channel mean rises with the class id)
    reds = [data.x_train[data.y_train == c][..., 0].mean() for c in range(3)]
    assert reds[0] < reds[1] < reds[2]
    again = images.read_folder(folder, image_size=32, cache_root=tmp_path, progress=False)
    assert again.reused and not data.reused
    np.testing.assert_array_equal(again.x_train, data.x_train)
    np.testing.assert_array_equal(again.y_test, data.y_test)
    mixed = images.read_folder(folder, cache_root=tmp_path, progress=False)
    assert mixed.x_train.shape[1:] == (images.DEFAULT_SIZE, images.DEFAULT_SIZE, 3), "mixed sizes: the default"


def test_own_test_split_and_load_data(tmp_path):
    make_folder(tmp_path / "ds" / "train", per_class=8)
    make_folder(tmp_path / "ds" / "test", per_class=4, seed=1)
    splits = load_data(tmp_path / "ds", seed=0, cache_root=tmp_path / "cache", progress=False)
    assert splits.class_names == CLASSES and splits.num_classes == 3
    assert len(splits.y_train) == 3 * 8 and len(splits.y_test) == 3 * 4  # the corrupt and truncated extras skipped
    side = images.DEFAULT_SIZE  # several sizes in the folder: stored at the default side
    assert splits.image_shape == (side, side, 3)
    from search.selection import default_val_size

    assert len(splits.val_idx) == default_val_size(24, 3) == 7, "capped at 30 % of the training images"
    assert np.bincount(splits.y_train[splits.val_idx]).min() >= 2, "stratified"


@pytest.mark.parametrize("make, message", [
    (lambda r: r.mkdir(), "no class folders"),
    (lambda r: (r / "only").mkdir(parents=True) or _img(r / "only" / "a.png"), "one class folder"),
    (lambda r: [(r / c).mkdir(parents=True) for c in "ab"] and _img(r / "a" / "x.png"),
     "class folder .*b has no image"),
    (lambda r: [(r / c).mkdir(parents=True) for c in "ab"] and [(r / c / "x.jpg").write_bytes(b"no") for c in "ab"],
     "no decodable image"),
])
def test_bad_folders_refused_in_one_line_naming_them(tmp_path, make, message):
    root = tmp_path / "bad"
    make(root)
    with pytest.raises(UserError, match=message):
        images.read_folder(root, image_size=16, cache_root=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "data").exists() or not any((tmp_path / "cache" / "data").glob("*.npz")), \
        "nothing written for a refused folder"


def test_missing_folder_and_bad_size(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_data(tmp_path / "nope.npz")
    with pytest.raises(UserError, match="image size"):
        images.read_folder(tmp_path, image_size=4, cache_root=tmp_path)


def _img(path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


@pytest.mark.skipif(not SHARED.exists() or not os.environ.get("CIFAR10_NPZ"),
                    reason="needs ../shared's CIFAR-10 JPEG archive and $CIFAR10_NPZ built from it")
def test_cifar10_jpeg_folder_gives_the_npz_images(tmp_path):
    """A subset of the archive unpacked as class folders decodes to exactly the .npz's images."""
    per_class, wanted = 20, {}
    root = tmp_path / "cifar"
    with tarfile.open(SHARED, "r:xz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train":
                continue
            cls = parts[-2]
            if len(wanted.setdefault(cls, [])) >= per_class:
                if len(wanted) == 10 and all(len(v) >= per_class for v in wanted.values()):
                    break
                continue
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / parts[-1]).write_bytes(tar.extractfile(member).read())
            wanted[cls].append(parts[-1])
    data = images.read_folder(root, cache_root=tmp_path / "cache", progress=False)
    assert data.x_train.shape[1:] == (32, 32, 3), "CIFAR's own size kept"
    from search.data import CLASS_NAMES, read_npz

    assert data.class_names == CLASS_NAMES
    x_train, y_train, _, _ = read_npz(os.environ["CIFAR10_NPZ"])
    index = {x.tobytes(): int(y) for x, y in zip(x_train, np.ravel(y_train), strict=True)}
    x = np.concatenate([data.x_train, data.x_test])
    y = np.concatenate([data.y_train, data.y_test])
    assert len(x) == 10 * per_class
    assert all(index.get(img.tobytes()) == label for img, label in zip(x, y, strict=True))


def test_search_final_and_report_on_a_folder(folder, tmp_path):
    """Both phases, the final model and the report on 3 classes; the sidecar names the classes."""
    from search.cli import main

    common = ["--data", str(folder), "--image-size", "32", "--weights", "none", "--resolution", "32",
              "--cache-dir", str(tmp_path / "cache"), "--results", str(tmp_path / "results"), "--quiet"]
    keras.utils.set_random_seed(0)
    assert main(["search", *common, "--trials", "2", "--tail-trials", "1", "--max-epochs", "1",
                 "--tail-max-epochs", "1", "--head-rows", "0", "--tail-rows", "0", "--tail-precision", "float32"]) == 0
    output = tmp_path / "own.h5"
    assert main(["final", *common, "--head-epochs", "2", "--tail-epochs", "1", "--output", str(output),
                 "--tail-precision", "float32", "--name", "own", "--reference-resolution", "32"]) == 0
    # a named run writes into its own folder, and still finds the searches of its cache key
    assert not (tmp_path / "results" / "final.json").exists()
    final = json.loads((tmp_path / "results" / "runs" / "own" / "final.json").read_text())
    assert (tmp_path / "results" / "runs" / "own" / "ablation.json").exists()
    assert final["class_names"] == list(CLASSES) and final["data"]["classes"] == 3
    assert np.array(final["test_confusion_matrix"]).shape == (3, 3)
    assert final["normalized_time"]["reference"]["start"]["resolution"] == 32  # --reference-resolution honoured
    for phase in ("head", "tail"):  # each phase's search was weighed against its defaults' trial
        provenance = final["params_provenance"][phase]
        assert provenance["decision"]["ship"] == provenance["source"], provenance
    sidecar = json.loads(Path(final["sidecar_path"]).read_text())
    assert sidecar["class_names"] == list(CLASSES) and sidecar["input_shape"] == [32, 32, 3]
    model = keras.models.load_model(output)
    assert model.output.shape[-1] == 3
    assert main(["report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").exists()
