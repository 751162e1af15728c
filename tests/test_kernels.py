"""Every attention kernel registered for this backend must equal the reference path."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from meliad_core.layers.attention import reference_attend, window_mask
from meliad_core.plugins import get_plugin_manager
from model_helpers import copy_trainable, make_model, randomize_weights, segment_batch, tiny_recipe, to_numpy

BACKEND = keras.backend.backend()
MANAGER = get_plugin_manager()
KERNELS = [name for name in MANAGER.names("attention_kernel")
           if name != "reference" and MANAGER.get("attention_kernel", name).unavailable_reason(BACKEND) is None]


def _inputs(rng, b=2, g=3, nq=4, nk=8, h=2, d=8):
    q = rng.normal(size=(b, g, nq, h, d)).astype("float32")
    k = rng.normal(size=(b, g, nk, h, d)).astype("float32")
    v = rng.normal(size=(b, g, nk, h, d)).astype("float32")
    bias = rng.normal(size=(h, nq, nk)).astype("float32")
    scale = rng.uniform(0.5, 3.0, size=(h,)).astype("float32")
    return q, k, v, bias, scale


def test_kernel_list_is_what_this_backend_should_have():
    expected = {"torch": {"torch_sdpa"}}.get(BACKEND, set())
    assert expected <= set(KERNELS)


@pytest.mark.parametrize("kernel_name", KERNELS or [pytest.param("none", marks=pytest.mark.skip("no fast kernel"))])
@pytest.mark.parametrize("case", ["window", "no_cache_with_empty_row", "no_mask_no_bias", "no_scale"])
def test_kernel_equals_reference(kernel_name, case):
    kernel = MANAGER.get("attention_kernel", kernel_name).obj
    rng = np.random.default_rng(0)
    q, k, v, kwargs = _case(case, *_inputs(rng))
    expected = to_numpy(reference_attend(q, k, v, **kwargs))
    got = to_numpy(kernel.attend(q, k, v, **kwargs))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if case == "no_cache_with_empty_row":
        assert not got[:, :, 0].any()  # a token with no visible key attends to nothing


@pytest.mark.parametrize("kernel_name", KERNELS or [pytest.param("none", marks=pytest.mark.skip("no fast kernel"))])
@pytest.mark.parametrize("arch", ["xl", "recurrent"])
def test_model_with_kernel_equals_reference_model(kernel_name, arch):
    reference = make_model(tiny_recipe(arch, attention={"kernel": "reference"}))
    fast = make_model(tiny_recipe(arch, attention={"kernel": kernel_name}))
    randomize_weights(reference, seed=3)
    copy_trainable(reference, fast)
    tokens = np.random.default_rng(4).integers(1, 50, size=(2, 8)).astype("int32")
    for start in (True, False):
        np.testing.assert_allclose(to_numpy(fast(segment_batch(tokens, start))),
                                   to_numpy(reference(segment_batch(tokens, start))), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(BACKEND != "torch", reason="gradient check written with torch autograd")
def test_torch_sdpa_gradients_equal_reference():
    import torch

    kernel = MANAGER.get("attention_kernel", "torch_sdpa").obj
    rng = np.random.default_rng(1)
    arrays = _inputs(rng)
    grads = []
    for fn in (lambda *a, **kw: reference_attend(*a, **kw), kernel.attend):
        # on the Keras default device (the GPU when there is one), like every other tensor here
        q, k, v, bias, scale = [keras.ops.convert_to_tensor(a).detach().requires_grad_(True) for a in arrays]
        out = fn(q, k, v, bias=bias, mask=window_mask(4, 8, 4), scale=scale)
        (out * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum().backward()
        grads.append([t.grad.cpu().numpy() for t in (q, k, v, bias, scale)])
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


CASES = ["window", "no_cache_with_empty_row", "no_mask_no_bias", "no_scale"]


def _case(case, q, k, v, bias, scale):
    kwargs = {"window": dict(bias=bias, mask=window_mask(4, 8, 4), scale=scale),
              "no_cache_with_empty_row": dict(bias=bias[:, :, :4], mask=window_mask(4, 4, 4, offset=0), scale=scale),
              "no_mask_no_bias": dict(scale=scale),
              "no_scale": dict(bias=bias, mask=window_mask(4, 8, 4))}[case]
    if case == "no_cache_with_empty_row":
        k, v = k[:, :, :4], v[:, :, :4]
    return q, k, v, kwargs


# jax_dpa is registered but not available on CPU (no gain there), so the parametrised tests above skip
# it on CPU; these test the kernel object itself wherever the backend is JAX.
@pytest.mark.skipif(BACKEND != "jax", reason="jax_dpa serves the jax backend only")
@pytest.mark.parametrize("case", CASES)
def test_jax_dpa_forward_and_gradients_equal_reference(case):
    import jax

    from meliad_jax.attention import JaxDotProductAttention

    kernel = JaxDotProductAttention()
    q, k, v, kwargs = _case(case, *_inputs(np.random.default_rng(5)))
    bias, scale = kwargs.pop("bias", None), kwargs.pop("scale", None)
    out_weights = np.linspace(-1, 1, q.size).reshape(q.shape).astype("float32")

    def loss(fn):
        return lambda q, k, v, bias, scale: (fn(q, k, v, bias=bias, scale=scale, **kwargs) * out_weights).sum()

    got = jax.jit(lambda *a: kernel.attend(*a[:3], bias=a[3], scale=a[4], **kwargs))(q, k, v, bias, scale)
    expected = reference_attend(q, k, v, bias=bias, scale=scale, **kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    if case == "no_cache_with_empty_row":
        assert not np.asarray(got)[:, :, 0].any()
    argnums = tuple(i for i, x in enumerate((q, k, v, bias, scale)) if x is not None)
    g_fast = jax.jit(jax.grad(loss(kernel.attend), argnums=argnums))(q, k, v, bias, scale)
    g_ref = jax.grad(loss(reference_attend), argnums=argnums)(q, k, v, bias, scale)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(BACKEND != "jax", reason="jax_dpa serves the jax backend only")
def test_jax_dpa_with_dropout_mask_runs_the_reference_and_auto_skips_it_on_cpu():
    import jax

    from meliad_jax.attention import JaxDotProductAttention

    q, k, v, bias, scale = _inputs(np.random.default_rng(6))
    drop = (np.random.default_rng(7).uniform(size=(2, 4, 8)) > 0.3).astype("float32") / 0.7
    kwargs = dict(bias=bias, mask=window_mask(4, 8, 4), scale=scale, dropout_mask=drop)
    np.testing.assert_allclose(np.asarray(JaxDotProductAttention().attend(q, k, v, **kwargs)),
                               np.asarray(reference_attend(q, k, v, **kwargs)), rtol=1e-6, atol=1e-6)
    reason = MANAGER.get("attention_kernel", "jax_dpa").unavailable_reason("jax")
    assert (reason is None) == (jax.default_backend() != "cpu")
    assert MANAGER.get("attention_kernel", "jax_dpa").unavailable_reason("torch") is not None


@pytest.mark.skipif(BACKEND != "jax", reason="jax_dpa serves the jax backend only")
def test_model_with_jax_dpa_equals_reference_model(monkeypatch):
    monkeypatch.setenv("MELIAD_JAX_DPA_ON_CPU", "1")
    test_model_with_kernel_equals_reference_model("jax_dpa", "xl")


# tf_xla is registered but not available on CPU (slower there), so the parametrised tests above skip it
# on CPU; these test the kernel object itself wherever the backend is TensorFlow, inside a tf.function as
# in a training step.
def _tf_forward_and_gradients(attend, q, k, v, kwargs):
    import tensorflow as tf

    kwargs = dict(kwargs)
    bias, scale = kwargs.pop("bias", None), kwargs.pop("scale", None)
    out_weights = tf.constant(np.linspace(-1, 1, q.size).reshape(q.shape).astype("float32"))
    inputs = [tf.constant(x) for x in (q, k, v, bias, scale) if x is not None]

    @tf.function
    def run(*inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            q, k, v, *rest = inputs
            extra = dict(zip([n for n, x in (("bias", bias), ("scale", scale)) if x is not None], rest))
            out = attend(q, k, v, **extra, **kwargs)
            total = tf.reduce_sum(out * out_weights)
        return out, tape.gradient(total, inputs)

    out, grads = run(*inputs)
    return out.numpy(), [g.numpy() for g in grads]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf_xla serves the tensorflow backend only")
@pytest.mark.parametrize("case", CASES + ["window_with_dropout"])
def test_tf_xla_forward_and_gradients_equal_reference(case):
    from meliad_tensorflow.attention import TFXLAAttention

    q, k, v, kwargs = _case(case.replace("_with_dropout", ""), *_inputs(np.random.default_rng(8)))
    if case.endswith("_with_dropout"):  # the layer's own (H, Q, K) multiplier: the reference's pattern exactly
        keep = np.random.default_rng(9).uniform(size=(2, 4, 8)) > 0.3
        kwargs["dropout_mask"] = keep.astype("float32") / 0.7
    got, g_fast = _tf_forward_and_gradients(TFXLAAttention().attend, q, k, v, kwargs)
    expected, g_ref = _tf_forward_and_gradients(reference_attend, q, k, v, kwargs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if case == "no_cache_with_empty_row":
        assert not got[:, :, 0].any()
    assert len(g_fast) == len(g_ref)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf_xla serves the tensorflow backend only")
def test_tf_xla_is_picked_by_auto_only_off_cpu(monkeypatch):
    import tensorflow as tf

    from meliad_core.assemble import attention_kernel

    entry = MANAGER.get("attention_kernel", "tf_xla")
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    assert (entry.unavailable_reason("tensorflow") is None) == on_gpu
    assert entry.unavailable_reason("jax") is not None
    assert attention_kernel("auto", backend="tensorflow").name == ("tf_xla" if on_gpu else "reference")
    monkeypatch.setenv("MELIAD_TF_XLA_ON_CPU", "1")
    assert entry.unavailable_reason("tensorflow") is None


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf_xla serves the tensorflow backend only")
@pytest.mark.parametrize("arch", ["xl", "recurrent"])
def test_model_with_tf_xla_equals_reference_model(monkeypatch, arch):
    monkeypatch.setenv("MELIAD_TF_XLA_ON_CPU", "1")
    test_model_with_kernel_equals_reference_model("tf_xla", arch)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf_xla serves the tensorflow backend only")
def test_training_step_with_tf_xla_and_attention_dropout_equals_reference(monkeypatch):
    """A compiled train step with attn_dropout > 0: the same weights after a step (same dropout draws)."""
    monkeypatch.setenv("MELIAD_TF_XLA_ON_CPU", "1")
    models = []
    for kernel in ("reference", "tf_xla"):
        keras.utils.set_random_seed(11)
        model = make_model(tiny_recipe("xl", attention={"kernel": kernel}, model={"attn_dropout": 0.3}))
        randomize_weights(model, seed=3)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        tokens = np.random.default_rng(4).integers(1, 50, size=(2, 8)).astype("int32")
        logs = model.train_on_batch(segment_batch(tokens, True), return_dict=True)
        models.append((model, logs))
    (reference, ref_logs), (fast, fast_logs) = models
    assert fast_logs["loss"] == pytest.approx(ref_logs["loss"], rel=1e-5)
    for a, b in zip(fast.trainable_weights, reference.trainable_weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-5, err_msg=a.path)
