"""Each fast attention kernel of this backend against the reference path: agreement and speed.

    KERAS_BACKEND=torch python benchmarks/kernels.py [--batch 8] [--segment 4096] [--window 512]
    KERAS_BACKEND=tensorflow python benchmarks/kernels.py --kernels reference tf_xla   # also unavailable ones

Inputs have the geometry of a sliding-window layer (G = segment/window blocks of W queries over 2W
keys, T5 bias, learned scale, meliad's window mask). Times are medians over repeats of forward and of
forward+backward, after warm-up, each compiled as inside a training step: jax.jit on JAX, tf.function
(no XLA unless the kernel asks for it) on TensorFlow, eager on torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _sync(x):
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif backend == "jax":
        x.block_until_ready()
    elif backend == "tensorflow":
        x.numpy()
    return x


def _timed(fn, repeats: int) -> float:
    _sync(fn())
    _sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _forward(kernel, q, k, v, kwargs):
    """The forward pass as timed: jitted on JAX, in a tf.function on TensorFlow (as inside a training
    step), eager on torch."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        fn = jax.jit(lambda q, k, v, kw: kernel.attend(q, k, v, **kw))
        return lambda: fn(q, k, v, kwargs)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda q, k, v: kernel.attend(q, k, v, **kwargs))
        return lambda: fn(q, k, v)
    return lambda: kernel.attend(q, k, v, **kwargs)


def _fwd_bwd(kernel, q, k, v, kwargs):
    """Forward and backward (gradients of q, k, v, bias and scale; torch: of q, k, v): torch eager, JAX
    jitted, TensorFlow in a tf.function."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        def loss(q, k, v, bias, scale):
            return kernel.attend(q, k, v, bias=bias, mask=kwargs["mask"], scale=scale).sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        return lambda: grad(q, k, v, kwargs["bias"], kwargs["scale"])[0]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        @tf.function
        def grads(q, k, v, bias, scale):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v, bias, scale])
                out = tf.reduce_sum(kernel.attend(q, k, v, bias=bias, mask=kwargs["mask"], scale=scale))
            return tape.gradient(out, [q, k, v, bias, scale])[0]

        return lambda: grads(q, k, v, kwargs["bias"], kwargs["scale"])
    if keras.backend.backend() != "torch":
        return None
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))

    def step():
        out = kernel.attend(q, k, v, **kwargs)
        out.sum().backward()
        return out

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--segment", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kernels", nargs="+", default=None,
                        help="kernels to time, available here or not (default: those available)")
    args = parser.parse_args()

    import keras
    import numpy as np
    from keras import ops

    from _common import accelerator_in_use, machine, print_table
    from meliad_core.layers.attention import window_mask
    from meliad_core.plugins import get_plugin_manager

    backend = keras.backend.backend()
    manager = get_plugin_manager()
    names = args.kernels or [n for n in manager.names("attention_kernel")
                             if manager.get("attention_kernel", n).unavailable_reason(backend) is None]
    print(f"command: KERAS_BACKEND={backend} python benchmarks/kernels.py {' '.join(sys.argv[1:])}")
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"machine: {machine()}; device in use: {accelerator_in_use()}; load at start {load}")
    b, w, h, d = args.batch, args.window, args.heads, args.head_dim
    g = args.segment // w
    rng = np.random.default_rng(0)

    def unit(shape):
        x = rng.normal(size=shape).astype("float32")
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = ops.convert_to_tensor(unit((b, g, w, h, d)))
    k = ops.convert_to_tensor(unit((b, g, 2 * w, h, d)))
    v = ops.convert_to_tensor(rng.normal(size=(b, g, 2 * w, h, d)).astype("float32"))
    kwargs = {"bias": ops.convert_to_tensor(rng.normal(size=(h, w, 2 * w)).astype("float32")),
              "mask": ops.convert_to_tensor(window_mask(w, 2 * w, w)),
              "scale": ops.convert_to_tensor(rng.uniform(1, 4, size=(h,)).astype("float32"))}
    reference = manager.get("attention_kernel", "reference").obj
    expected = np.asarray(ops.convert_to_numpy(reference.attend(q, k, v, **kwargs)))
    rows = []
    for name in names:
        reason = manager.get("attention_kernel", name).unavailable_reason(backend)
        if reason:
            print(f"{name}: not picked by auto here ({reason}); timed anyway")
        kernel = manager.get("attention_kernel", name).obj
        got = np.asarray(ops.convert_to_numpy(kernel.attend(q, k, v, **kwargs)))
        error = float(np.abs(got - expected).max())
        fwd = _timed(_forward(kernel, q, k, v, kwargs), args.repeats)
        step = _fwd_bwd(kernel, q, k, v, kwargs)
        both = _timed(step, args.repeats) if step else None
        rows.append([name, f"{error:.2e}", f"{fwd * 1000:.2f}", f"{both * 1000:.2f}" if both else "-"])
    print(f"shape: batch {b}, {g} blocks of {w} queries over {2 * w} keys, {h} heads x {d}, float32")
    print_table(["kernel", "max |diff| vs reference", "forward ms", "forward+backward ms"], rows)


if __name__ == "__main__":
    main()
