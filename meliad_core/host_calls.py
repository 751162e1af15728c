"""Host calls from compiled code: the one place in meliad that runs host Python inside a train step.

A host memory store (an ANN index in host RAM) is called from the middle of the model's forward
pass, which Keras compiles on JAX (`jax.jit`) and TensorFlow (`tf.function`) and runs eagerly on
PyTorch. `host_call(fn, args, results)` hides the difference, so a store author never writes
backend code:

    jax         `jax.experimental.io_callback(..., ordered=True)`: runs on the host each time the
                compiled step runs, in program order, never dropped as dead code (its results may be
                unused) nor reordered with other host calls; the arguments are `stop_gradient`-ed.
    tensorflow  `tf.numpy_function(..., stateful=True)`: a stateful op, so `tf.function`'s
                automatic control dependencies keep host calls in program order; no gradient.
                It cannot run under XLA (`jit_compile=True`), which Keras' "auto" only picks on a GPU/TPU.
    torch       a plain call on `.detach().cpu().numpy()` copies; results come back as tensors on the
                arguments' device. Under Keras' shape inference (meta tensors) `fn` is not called and
                zeros of the declared shapes come back.

`fn` receives numpy arrays and returns numpy arrays of exactly the declared shapes and dtypes (they
are checked). Nothing flows back through a host call: no gradient reaches its arguments.

Cost, per call: one device→host copy of the arguments and one host→device copy of the results, plus
a synchronisation point (the step waits for the host function: on JAX and TensorFlow the compiled
program stops at the callback, on torch the call is synchronous anyway). For the kNN memory this is
one call per memory layer per segment carrying the queries, keys and values in (3·B·H·N·D floats)
and the neighbours out (2·B·H·N·k·D floats); on a CPU the copies are memcpy-cheap, and the host
function's own work (the index) dominates.

Nothing here imports a framework at module import: each backend's module is imported inside
`host_call`, and only the running Keras backend's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

ResultSpec = tuple[tuple[int, ...], str]  # (static shape, dtype name)


def _checked(fn: Callable, results: Sequence[ResultSpec], name: str):
    """`fn` wrapped to take numpy arrays and return a tuple of arrays of the declared shapes and dtypes."""

    def call(*arrays):
        out = fn(*[np.asarray(a) for a in arrays])
        if not isinstance(out, (tuple, list)):
            out = (out,)
        if len(out) != len(results):
            raise ValueError(f"host call {name!r} returned {len(out)} arrays, expected {len(results)}")
        checked = []
        for i, (value, (shape, dtype)) in enumerate(zip(out, results)):
            value = np.asarray(value)
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"host call {name!r} returned result {i} of shape {tuple(value.shape)}, "
                                 f"expected {tuple(shape)}")
            checked.append(np.asarray(value, dtype=np.dtype(dtype), order="C"))  # keeps 0-d results 0-d
        return tuple(checked)

    return call


def host_call(fn: Callable, args: Sequence, results: Sequence[ResultSpec], name: str = "host_call") -> tuple:
    """Runs `fn(*numpy_args) -> tuple of numpy arrays` on the host from inside a compiled step.

    args: tensors of the running backend (or numpy arrays); results: one (static shape, dtype) per
    returned array. Returns a tuple of backend tensors. Calls run in program order and each time
    the step runs; no gradient flows through them (see the module docstring for the cost).
    """
    import keras

    results = [(tuple(int(d) for d in shape), str(dtype)) for shape, dtype in results]
    call = _checked(fn, results, name)
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_call(call, args, results)
    if backend == "tensorflow":
        return _tf_call(call, args, results, name)
    if backend == "torch":
        return _torch_call(call, args, results)
    # numpy (and any other eager backend): a plain call
    return tuple(keras.ops.convert_to_tensor(r) for r in call(*[keras.ops.convert_to_numpy(a) for a in args]))


def _jax_call(call, args, results):
    import jax
    from jax.experimental import io_callback

    args = [jax.lax.stop_gradient(jax.numpy.asarray(a)) for a in args]
    shapes = [jax.ShapeDtypeStruct(shape, np.dtype(dtype)) for shape, dtype in results]
    return tuple(io_callback(call, shapes, *args, ordered=True))


def _tf_call(call, args, results, name):
    import tensorflow as tf

    args = [tf.stop_gradient(tf.convert_to_tensor(a)) for a in args]
    outs = tf.numpy_function(call, args, [tf.as_dtype(dtype) for _, dtype in results], stateful=True,
                             name=name.replace(" ", "_"))
    if not isinstance(outs, (list, tuple)):
        outs = [outs]
    for out, (shape, _) in zip(outs, results):
        out.set_shape(shape)
    return tuple(outs)


def _torch_call(call, args, results):
    import torch

    tensors = [a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a)) for a in args]
    device = tensors[0].device if tensors else torch.device("cpu")
    if any(t.device.type == "meta" for t in tensors):  # Keras' shape inference: nothing to compute
        return tuple(torch.zeros(shape, dtype=getattr(torch, dtype), device="meta") for shape, dtype in results)
    out = call(*[t.detach().cpu().numpy() for t in tensors])
    return tuple(torch.from_numpy(o).to(device) for o in out)


def host_barrier() -> None:
    """Waits until every host call dispatched so far has run (JAX runs compiled steps asynchronously)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.effects_barrier()
