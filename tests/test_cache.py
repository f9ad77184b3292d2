"""The cache: key, manifest, exactly-once extraction, resume, corruption, --no-build."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import TINY_RES
from search.cache import CacheKey, ensure_cache, verify
from search.errors import UserError


def _build(spec, splits, root, **kwargs):
    kwargs = {"resolution": TINY_RES, "weights": None, "root": root, "chunk_size": 50,
              "progress": False, "flip": False, **kwargs}
    return ensure_cache(spec, splits, **kwargs)


@pytest.fixture(scope="module")
def model(spec):
    import keras

    keras.utils.set_random_seed(0)
    return spec.build(weights=None, size=TINY_RES)


def test_key_changes_with_every_field():
    key = CacheKey("MobileNet", "imagenet", "w", 224, "conv_pw_11_relu", "d", True)
    other = {"backbone": "MobileNetV2", "weights": "None", "weights_fingerprint": "w2", "resolution": 160,
             "cut_layer": "conv_pw_12_relu", "data_fingerprint": "d2", "flip": False, "format_version": 2}
    fields = [f.name for f in dataclasses.fields(CacheKey)]
    assert sorted(other) == sorted(fields), "every field of the key is varied below"
    ids = {key.id} | {dataclasses.replace(key, **{name: other[name]}).id for name in fields}
    assert len(ids) == len(fields) + 1


def test_contents_shapes_and_exactly_once(tiny_splits, spec, model, tmp_path):
    calls = []
    cache = _build(spec, tiny_splits, tmp_path, model=model, flip=True,
                   on_chunk=lambda prefix, a, b: calls.append((prefix, a, b)))
    n_train, n_test = len(tiny_splits.x_train), len(tiny_splits.x_test)
    # every image through the frozen part exactly once per view, in chunks of 50
    covered = {p: sum(b - a for q, a, b in calls if q == p) for p in {c[0] for c in calls}}
    assert covered == {"train_orig": n_train, "train_flip": n_train, "test_orig": n_test, "test_flip": n_test}
    cut = cache.array("train", "cut")
    assert cut.shape == (n_train, 2, 2, 512) and cut.dtype == np.float16
    assert isinstance(cut, np.memmap)
    assert cache.array("test", "pool", "flip").shape == (n_test, 1024)
    # a second call reuses it: the frozen part does not run again
    again_calls = []
    again = _build(spec, tiny_splits, tmp_path, model=model, flip=True,
                   on_chunk=lambda *a: again_calls.append(a))
    assert again.stats["hit"] and again_calls == []
    # cached values are what the extractor computes
    from search.cache import build_extractor

    extractor = build_extractor(model, spec, spec.cut_layer(), TINY_RES)
    cut_ref, pool_ref = extractor.predict(tiny_splits.x_test[:5], verbose=0)
    np.testing.assert_allclose(cache.array("test", "pool")[:5], pool_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.array("test", "cut")[:5], cut_ref.astype(np.float16))
    flipped = extractor.predict(tiny_splits.x_test[:5, :, ::-1], verbose=0)[1]
    np.testing.assert_allclose(cache.array("test", "pool", "flip")[:5], flipped, rtol=1e-5, atol=1e-5)


def test_interrupted_extraction_resumes_without_recomputing(tiny_splits, spec, model, tmp_path):
    class Killed(Exception):
        pass

    seen = []

    def die_after_two(prefix, a, b):
        seen.append((prefix, a))
        if len(seen) == 2:
            raise Killed

    with pytest.raises(Killed):
        _build(spec, tiny_splits, tmp_path / "a", model=model, on_chunk=die_after_two)
    resumed = []
    cache = _build(spec, tiny_splits, tmp_path / "a", model=model, on_chunk=lambda p, a, b: resumed.append((p, a)))
    assert not set(seen) & set(resumed), "finished chunks must not be recomputed"
    total_chunks = -(-len(tiny_splits.x_train) // 50) + -(-len(tiny_splits.x_test) // 50)
    assert len(seen) + len(resumed) == total_chunks
    clean = _build(spec, tiny_splits, tmp_path / "b", model=model)
    for split in ("train", "test"):
        for kind in ("cut", "pool"):
            np.testing.assert_array_equal(cache.array(split, kind), clean.array(split, kind))


def _damage_and_check(spec, tiny_splits, model, root, damage):
    cache = _build(spec, tiny_splits, root, model=model)
    damage(cache.path)
    key = CacheKey(**cache.manifest["key"])
    assert verify(cache.path, key) is not None
    with pytest.raises(UserError, match="no usable cache"):
        _build(spec, tiny_splits, root, model=model, build=False)
    rebuilt = _build(spec, tiny_splits, root, model=model)
    assert not rebuilt.stats["hit"] and verify(rebuilt.path, key) is None


def test_truncated_file_is_rebuilt(tiny_splits, spec, model, tmp_path):
    def truncate(path):
        f = path / "train_orig_cut.npy"
        f.write_bytes(f.read_bytes()[:-100])

    _damage_and_check(spec, tiny_splits, model, tmp_path, truncate)


def test_edited_data_is_rebuilt(tiny_splits, spec, model, tmp_path):
    def edit(path):
        arr = np.load(path / "test_orig_pool.npy", mmap_mode="r+")
        arr[0] += 1.0
        arr.flush()

    _damage_and_check(spec, tiny_splits, model, tmp_path, edit)


def test_foreign_manifest_is_rebuilt(tiny_splits, spec, model, tmp_path):
    def foreign(path):
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["key"]["resolution"] = 224
        (path / "manifest.json").write_text(json.dumps(manifest))

    _damage_and_check(spec, tiny_splits, model, tmp_path, foreign)


def test_other_data_gets_another_cache(tiny_splits, spec, model, tmp_path):
    a = _build(spec, tiny_splits, tmp_path, model=model)
    b = _build(spec, tiny_splits.subset(100, 40, 20), tmp_path, model=model)
    assert a.path != b.path


def test_missing_cache_with_no_build(tiny_splits, spec, model, tmp_path):
    with pytest.raises(UserError, match="no usable cache"):
        _build(spec, tiny_splits, tmp_path, model=model, build=False)
