"""Keras Applications by name: constructor, ``preprocess_input``, native size, named cut points.

Entry point: :func:`get_backbone`. To add a backbone, add one :class:`BackboneSpec` row to
``BACKBONES``. A *cut* names the layer whose output is cached; every layer after it (up to the
backbone's pooled output) is the trainable *tail*, everything up to it is frozen and runs over
the data exactly once (see ``search.cache``).

The functions registered with ``keras.saving.register_keras_serializable`` below are what the
saved model's Lambda layers call, so ``cifar10.h5`` loads with the default ``safe_mode`` once
this module is imported (``0-transfer.py`` imports it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from search.errors import UserError

SERIALIZATION_PACKAGE = "transfer"
MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
def upsample(x: Any, size: int = 224) -> Any:
    """Bilinear resize of a ``(b, h, w, c)`` batch to ``(b, size, size, c)`` float32."""
    return keras.ops.image.resize(keras.ops.cast(x, "float32"), (size, size), interpolation="bilinear")


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
def preprocess(x: Any, backbone: str = "MobileNet") -> Any:
    """The named backbone's own ``preprocess_input`` on 0-255 float pixels."""
    return get_backbone(backbone).preprocess_input(x)


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
def flip_left_right(x: Any) -> Any:
    """Mirror a ``(b, h, w, c)`` batch horizontally (test-time augmentation)."""
    return keras.ops.flip(x, axis=2)


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
def shift_cells(x: Any, dy: int = 0, dx: int = 0) -> Any:
    """Move a ``(b, h, w, c)`` batch by ``(dy, dx)`` cells, ``out[:, i, j] = x[:, i + dy, j + dx]``,
    zero fill (test-time augmentation, in the saved model and ``final.offset_probs``)."""
    s = max(abs(dy), abs(dx))
    h, w = x.shape[1], x.shape[2]
    padded = keras.ops.pad(x, [[0, 0], [s, s], [s, s], [0, 0]])
    return padded[:, s + dy:s + dy + h, s + dx:s + dx + w, :]


@dataclass(frozen=True)
class BackboneSpec:
    """One Keras Application.

    Attributes:
        name: the constructor's name in ``keras.applications`` (``"MobileNet"``).
        module: the submodule holding its ``preprocess_input`` (``"mobilenet"``).
        native_size: the input side its ImageNet weights were trained at.
        cuts: cut name -> layer name; the tail is every layer after that layer.
        default_cut: the cut used when none is given.
        default_size: the input side used when none is given (None: ``native_size``).
    """

    name: str
    module: str
    native_size: int
    cuts: dict[str, str]
    default_cut: str
    default_size: int | None = None

    def preprocess_input(self, x: Any) -> Any:
        """Map 0-255 float pixels to what this backbone expects (its own preprocess_input)."""
        return getattr(keras.applications, self.module).preprocess_input(x)

    def cut_layer(self, cut: str | None = None) -> str:
        """The layer name of cut ``cut`` (a cut name or a layer name)."""
        cut = cut or self.default_cut
        if cut in self.cuts:
            return self.cuts[cut]
        raise UserError(f"unknown cut {cut!r} for {self.name}; choose one of {sorted(self.cuts)}")

    def resolution(self, resolution: int | None = None) -> int:
        """The input side: ``resolution`` checked against 32..1024, default ``default_size``
        (else the native size)."""
        size = (self.default_size or self.native_size) if resolution is None else int(resolution)
        if not MIN_RESOLUTION <= size <= MAX_RESOLUTION:
            raise UserError(f"resolution must be in {MIN_RESOLUTION}..{MAX_RESOLUTION}, got {size}")
        return size

    def resolve(self, cut: str | None = None, resolution: int | None = None) -> tuple[str, int]:
        """``(cut layer name, input side)`` for a cut name and resolution, both checked, defaults filled."""
        return self.cut_layer(cut), self.resolution(resolution)

    def tail_blocks(self, cut_layer: str) -> tuple[str, ...]:
        """The block boundaries inside the tail of ``cut_layer``: the layer names of the cut points
        after it, nearest the cut first (cut ``last2``: ``(cuts["last1"],)``). A tail of ``k``
        blocks has ``k - 1`` of them; a cut given by no cut name has none (one block)."""
        names = [self.cuts[c] for c in sorted(self.cuts, key=lambda c: -int(c[len("last"):]))]
        return tuple(names[names.index(cut_layer) + 1:]) if cut_layer in names else ()

    def build(self, weights: str | None = "imagenet", size: int | None = None) -> keras.Model:
        """Construct the application, ``include_top=False``, global-average-pooled output.

        Input: ``(b, size, size, 3)`` preprocessed float32; output ``(b, features)`` float32.
        """
        size = self.resolution(size)
        ctor = getattr(keras.applications, self.name)
        try:
            return ctor(include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg")
        except Exception as exc:
            if weights == "imagenet" and ("URL" in str(exc) or "fetch" in str(exc).lower()):
                raise UserError(
                    f"cannot download ImageNet weights for {self.name}; offline, seed "
                    "~/.keras/models/ from ../shared/keras-cache/models/ (see README)") from None
            raise


def _mobilenet_v1_cuts() -> dict[str, str]:
    return {"last1": "conv_pw_12_relu", "last2": "conv_pw_11_relu", "last3": "conv_pw_10_relu"}


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        # 176 px by default: on CIFAR-10 the frontier's 176-px recipe (tail rate 1e-3) cleared
        # 88 % test on seeds 0 and 1 at about two thirds of the 224-px cost
        # (results/frontier.json, seeds.json); the ImageNet weights are the 224-px ones
        BackboneSpec("MobileNet", "mobilenet", 224, _mobilenet_v1_cuts(), "last2", default_size=176),
        BackboneSpec("MobileNetV2", "mobilenet_v2", 224,
                     {"last1": "block_15_add", "last2": "block_14_add",
                      "last3": "block_13_project_BN"}, "last2"),
        BackboneSpec("ResNet50", "resnet50", 224,
                     {"last1": "conv5_block2_out", "last2": "conv5_block1_out",
                      "last3": "conv4_block6_out"}, "last1"),
        BackboneSpec("EfficientNetB0", "efficientnet", 224,
                     {"last1": "block6d_add", "last2": "block6c_add"}, "last1"),
        BackboneSpec("DenseNet121", "densenet", 224,
                     {"last1": "conv5_block15_concat", "last2": "conv5_block14_concat"}, "last1"),
        BackboneSpec("ConvNeXtTiny", "convnext", 224,
                     # the residual adds are auto-named (add_N): cut at the input of a named layer
                     {"last1": "before:convnext_tiny_stage_3_block_2_depthwise_conv",
                      "last2": "before:convnext_tiny_stage_3_block_1_depthwise_conv"}, "last1"),
    )
}


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by name (case-insensitive); one clear error if unknown."""
    for key, spec in BACKBONES.items():
        if key.lower() == str(name).lower():
            return spec
    raise UserError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")


def input_stack(pixels: Any, spec: BackboneSpec, resolution: int) -> Any:
    """``(b, h, w, 3)`` 0-255 pixels -> Lambda(upsample) -> Lambda(preprocess): the backbone's input.

    The saved model and the cache's extractor both start with these two layers.
    """
    x = keras.layers.Lambda(upsample, arguments={"size": resolution}, name="upsample")(pixels)
    return keras.layers.Lambda(preprocess, arguments={"backbone": spec.name}, name="preprocess")(x)


def cut_layer_of(model: keras.Model, layer_name: str) -> keras.Operation:
    """The layer whose output is the cut: ``layer_name``, or for ``"before:NAME"`` the layer
    feeding NAME (for graphs whose merge layers have no stable name)."""
    try:
        if layer_name.startswith("before:"):
            return model.get_layer(layer_name[len("before:"):])._inbound_nodes[0].parent_nodes[0].operation
        return model.get_layer(layer_name)
    except ValueError:
        raise UserError(f"layer {layer_name!r} not found in {model.name}") from None


def split_at_cut(model: keras.Model, layer_name: str) -> keras.Model:
    """The tail of ``model``: a Model from the cut layer's output to ``model.output``.

    The tail shares its layers (and so its weights) with ``model``: training the tail trains
    the backbone in place, which is how the stitched model gets the fine-tuned weights.
    """
    cut = cut_layer_of(model, layer_name)
    layer_name = cut.name
    tail_input = keras.Input(cut.output.shape[1:], name="cut_activations")
    seen = {id(cut.output): tail_input}
    # Replay the graph after the cut in topological order (layers are shared, not copied).
    ops = model.operations
    for layer in ops[ops.index(cut) + 1:]:
        node = layer._inbound_nodes[0]
        args = keras.tree.map_structure(
            lambda t: seen.get(id(t), t) if isinstance(t, keras.KerasTensor) else t,
            (node.arguments.args, node.arguments.kwargs))
        missing = [t for t in keras.tree.flatten(args)
                   if isinstance(t, keras.KerasTensor) and id(t) not in {id(v) for v in seen.values()}]
        if missing:
            raise UserError(f"cut {layer_name!r} does not separate {model.name}: "
                            f"layer {layer.name} reads from before the cut")
        out = layer(*args[0], **args[1])
        for old, new in zip(keras.tree.flatten(node.outputs), keras.tree.flatten(out), strict=True):
            seen[id(old)] = new
    return keras.Model(tail_input, seen[id(model.outputs[0])], name=f"{model.name}_tail")


def frozen_layers(model: keras.Model, layer_name: str) -> list[keras.layers.Layer]:
    """Layers up to and including ``layer_name`` (the part computed once and cached)."""
    ops = model.operations
    before = ops[: ops.index(cut_layer_of(model, layer_name)) + 1]
    return [op for op in before if isinstance(op, keras.layers.Layer)]


def at_resolution(spec: BackboneSpec, model: keras.Model, resolution: int) -> keras.Model:
    """``model`` (built by ``spec.build``) with input side ``resolution``: ``model`` itself when
    it already has that side, else the application rebuilt at that side carrying ``model``'s
    weights (a convolutional backbone's weights do not depend on the input side)."""
    if model.input_shape[1] == resolution:
        return model
    copy = spec.build(weights=None, size=resolution)
    copy.set_weights(model.get_weights())
    return copy


# Images per timed call of the reference (every recorded run was timed in calls of 32).
REFERENCE_BATCH = 32
# How a call is timed. "compiled": one traced call of the frozen part on a fixed tensor, its output
# copied out: the frozen pass and nothing else. "predict": Keras ``Model.predict`` of the same batch,
# as runs before this choice were timed, which adds predict's own per-call work (its data adapter
# and loop): in a probe on a 2-core AMD EPYC at 224 px, predict calls ran at about 97 or 170
# images/s, call by call at random, while compiled calls in the same process ran at 211-227.
# bench-cache times both, alternating (bench_cache.json: reference_speed_by_method).
REFERENCE_METHODS = ("compiled", "predict")


def reference_speed(backbone: keras.Model, cut_layer: str, resolution: int, batch: int = REFERENCE_BATCH,
                    repeats: int = 7, warmups: int = 2, method: str = "compiled") -> dict:
    """This machine's speed now: the frozen part as the application builds it (input to
    ``cut_layer``, unfolded) on one fixed batch of ``batch`` images of side ``resolution``
    (``backbone``'s input side), called ``method`` (:data:`REFERENCE_METHODS`) after ``warmups``
    untimed calls; the median of ``repeats`` timed calls, with every speed kept. Measured inside
    the run it normalizes (``final.normalized_time``, at one side for runs of every resolution),
    never taken from another run or machine."""
    import time

    import tensorflow as tf

    if method not in REFERENCE_METHODS:
        raise ValueError(f"method must be one of {REFERENCE_METHODS}, got {method!r}")
    frozen = keras.Model(backbone.inputs, cut_layer_of(backbone, cut_layer).output)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32)
    if method == "compiled":
        step, tensor = tf.function(lambda images: frozen(images, training=False)), tf.constant(x)

        def call() -> None:
            step(tensor).numpy()
    else:
        def call() -> None:
            frozen.predict(x, batch_size=batch, verbose=0)
    for _ in range(max(1, warmups)):
        call()
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        speeds.append(batch / (time.perf_counter() - start))
    return {"images_per_second": float(np.median(speeds)), "min": float(min(speeds)), "max": float(max(speeds)),
            "speeds": [float(v) for v in speeds], "repeats": repeats, "warmups": warmups, "batch": batch,
            "resolution": resolution, "cut_layer": cut_layer, "method": method}


_FOLDABLE = ("Conv2D", "DepthwiseConv2D")


class _FoldedAway(keras.layers.Layer):
    """Stands where a BatchNormalization was folded into the convolution before it: identity."""

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        return inputs

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


def _foldable_pairs(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """BatchNormalization layer name -> the convolution it can be folded into: a Conv2D or
    DepthwiseConv2D with no activation whose output feeds only that BN (channels last)."""
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or layer.axis not in (-1, 3):
            continue
        nodes = layer._inbound_nodes
        if len(nodes) != 1 or len(nodes[0].parent_nodes) != 1:
            continue
        conv = nodes[0].parent_nodes[0].operation
        if (type(conv).__name__ in _FOLDABLE and len(conv._outbound_nodes) == 1
                and conv.get_config().get("activation") in ("linear", None) and conv.dtype_policy.name == "float32"):
            pairs[layer.name] = conv
    return pairs


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """An inference-only copy of ``model`` with every foldable BatchNormalization merged into the
    convolution before it (same inputs and outputs, float32; equal up to float rounding).

    BN in inference mode is the affine map ``y = gamma * (x - mean) / sqrt(var + eps) + beta``;
    after a convolution it becomes part of the kernel and a bias, so the frozen pass skips one
    read and write of every activation tensor (about 1.9x faster for MobileNet on a 2-core CPU,
    ``results/bench_cache.json``). Layers that cannot fold (BN after an add, say) are copied as
    they are. ``model`` itself is not changed: the saved model keeps the genuine application.
    """
    pairs = _foldable_pairs(model)
    convs = {conv.name: bn for bn, conv in ((model.get_layer(n), c) for n, c in pairs.items())}

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if layer.name in pairs:
            return _FoldedAway(name=layer.name)
        if layer.name in convs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in pairs or not layer.weights:
            continue
        new = folded.get_layer(layer.name)
        weights = [np.asarray(w) for w in layer.get_weights()]
        if layer.name in convs:
            bn = convs[layer.name]
            gamma = np.asarray(bn.gamma) if bn.scale else 1.0
            beta = np.asarray(bn.beta) if bn.center else 0.0
            scale = gamma / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
            kernel, bias = weights[0], (weights[1] if len(weights) > 1 else 0.0)
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                kernel = kernel * scale.reshape(1, 1, kernel.shape[2], kernel.shape[3])
            else:
                kernel = kernel * scale.reshape(1, 1, 1, -1)
            weights = [kernel, (bias - np.asarray(bn.moving_mean)) * scale + beta]
        new.set_weights(weights)
    return folded


def weights_fingerprint(model: keras.Model) -> str:
    """sha1 (16 hex chars) of every weight of ``model``, in order: the weights' identity."""
    h = hashlib.sha1()
    for w in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()[:16]

