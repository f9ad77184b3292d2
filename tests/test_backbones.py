"""Every listed backbone builds, splits at each cut, and caches on tiny inputs (random weights)."""

import keras
import numpy as np
import pytest

from search import backbones
from search.cache import ensure_cache
from search.errors import UserError

REQUIRED = ["MobileNet", "MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121", "ConvNeXtTiny"]


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
