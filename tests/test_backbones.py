"""Every listed backbone builds, splits at each cut, and caches on tiny inputs (random weights)."""

import keras
import numpy as np
import pytest

from search import backbones
from search.cache import ensure_cache
from search.errors import UserError

# the two with real weights here run in `make test`; the large ones in `make reliability` (marker slow)
REQUIRED = ["MobileNet", "MobileNetV2",
            *(pytest.param(name, marks=pytest.mark.slow)
              for name in ("ResNet50", "EfficientNetB0", "DenseNet121", "ConvNeXtTiny"))]


@pytest.mark.parametrize("name", REQUIRED)
def test_builds_splits_and_caches(name, tiny_splits, tmp_path):
    spec = backbones.get_backbone(name)
    model = spec.build(weights=None, size=32)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    full = np.asarray(model(x))  # eager calls: no graph tracing for two tiny images
    for cut, layer in spec.cuts.items():
        tail = backbones.split_at_cut(model, layer)
        head_of = keras.Model(model.inputs, backbones.cut_layer_of(model, layer).output)
        np.testing.assert_allclose(np.asarray(tail(head_of(x))), full, rtol=1e-4, atol=1e-4, err_msg=f"{name} {cut}")
    small = tiny_splits.subset(20, 10, 4)
    cache = ensure_cache(spec, small, resolution=32, weights=None, root=tmp_path, flip=False,
                         progress=False, model=model)
    assert cache.array("train", "pool").shape == (20, full.shape[1])


def test_unknown_backbone_and_cut():
    with pytest.raises(UserError, match="unknown backbone"):
        backbones.get_backbone("NoSuchNet")
    with pytest.raises(UserError, match="unknown cut"):
        backbones.get_backbone("MobileNet").cut_layer("last9")


def test_lookup_is_case_insensitive():
    assert backbones.get_backbone("mobilenetv2").name == "MobileNetV2"


def test_default_side_is_the_specs_own_else_the_native_one_and_is_checked():
    for spec in backbones.BACKBONES.values():
        assert spec.resolution() == (spec.default_size or spec.native_size)
        assert spec.resolve(None, 96) == (spec.cut_layer(), 96)
    mobilenet = backbones.get_backbone("MobileNet")
    assert mobilenet.resolution() == mobilenet.default_size != mobilenet.native_size
    with pytest.raises(UserError, match="resolution must be"):
        mobilenet.resolution(16)


@pytest.mark.parametrize("name", ["MobileNet", "MobileNetV2", pytest.param("ResNet50", marks=pytest.mark.slow)])
def test_folded_extractor_computes_the_same_function(name):
    """The extraction copy with BN folded into the convolutions gives the unfolded model's cut
    and pooled outputs, folds most BN layers, and leaves the original model as it was."""
    from search.cache import build_extractor

    spec = backbones.get_backbone(name)
    model = spec.build(weights=None, size=32)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # non-trivial statistics, so that a wrong fold would show
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
    before = backbones.weights_fingerprint(model)
    n_bn = sum(isinstance(la, keras.layers.BatchNormalization) for la in model.layers)
    assert len(backbones._foldable_pairs(model)) >= n_bn // 2
    cut, _ = spec.resolve(None, 32)
    x = rng.integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    plain = build_extractor(model, spec, cut, 32, fold=False)(x)
    folded_extractor = build_extractor(model, spec, cut, 32)
    folded = folded_extractor(x)
    assert not any(isinstance(la, keras.layers.BatchNormalization) and la.name in backbones._foldable_pairs(model)
                   for la in folded_extractor.layers[-1].layers)
    for a, b in zip(plain, folded, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    assert backbones.weights_fingerprint(model) == before
