"""MeliadLM: the decoder stack as a keras.Model with per-stream state, meliad's loss and metrics.

Each stream (train, eval, predict) keeps its own XL caches, memories and recurrent states in
non-trainable variables, so `fit`, `evaluate` and `predict` carry state across batches and never
clobber each other's (spec §4.3). `fit` uses the train stream, `evaluate` the eval stream, and
`predict` or a direct call the predict stream. The batch size is fixed: a batch slot is a document
stream (DESIGN principle 4).
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
from keras import ops

from meliad_core import assemble
from meliad_core.config import Recipe, RecipeError, validate_recipe
from meliad_core.layers.knn_memory import host_memories
from meliad_core.layers.stack import DecoderStack
from meliad_core.units import LOG2E

STREAMS = ("train", "eval", "predict")


def token_losses(tokens, logits, loss_mask_ids=()):
    """Per-token nats and the validity mask, as meliad scores a segment (spec §10.3).

    Ids are taken modulo V first, as the embedding does. Targets are the inputs shifted left inside
    the segment with 0 appended, so the last position (and with it the first token of the next
    segment) is never scored; id 0 is padding, and targets in `loss_mask_ids` are not scored either.
    Returns (nats (B, N) float32, valid (B, N) float32, targets (B, N) int32).
    """
    tokens = ops.cast(tokens, "int32") % logits.shape[-1]
    targets = ops.concatenate([tokens[:, 1:], ops.zeros_like(tokens[:, :1])], axis=1)
    valid = ops.logical_and(tokens > 0, targets > 0)
    for token_id in loss_mask_ids:
        valid = ops.logical_and(valid, targets != token_id)
    valid = ops.cast(valid, "float32")
    nats = ops.sparse_categorical_crossentropy(targets, ops.cast(logits, "float32"), from_logits=True)
    return nats * valid, valid, targets


DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}

# torch's default for `train.compile: null`: eager. Measured on 2 CPU cores (tiny_test XL, 1x256): the
# compiled step is ~2.5x faster, but compiling it takes minutes (570 s under load 18), once per
# process and again on every resume, so it pays off only for runs of thousands of steps per process;
# those set `train.compile: true`.
TORCH_COMPILE_DEFAULT = False


def compile_step(backend: str, compile: bool | None, host_store: bool = False) -> bool | str:
    """Keras' `jit_compile` for a recipe's `train.compile` on `backend` (see MeliadLM.compile)."""
    if backend == "jax":
        return True
    if backend == "tensorflow":
        if host_store:
            if compile:
                raise RecipeError("train.compile: true, but a host memory store cannot run inside XLA on "
                                  "TensorFlow; expected false or null with memory.store of this kind")
            return False
        return "auto" if compile is None else bool(compile)
    if backend == "torch":
        return TORCH_COMPILE_DEFAULT if compile is None else bool(compile)
    return "auto" if compile is None else bool(compile)


def _with_dtype_policy(dtype: str, make):
    """Builds layers under Keras' dtype policy for `dtype` (bfloat16: mixed precision, i.e. bfloat16
    compute with float32 weights and optimizer state), so that every sublayer gets it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(DTYPE_POLICIES[dtype])
    try:
        return make()
    finally:
        keras.config.set_dtype_policy(previous)


def _state_var_name(stream: str, key: str) -> str:
    return f"state_{stream}_{key.replace('/', '_')}"


@keras.saving.register_keras_serializable(package="meliad")
class MeliadLM(keras.Model):
    """Language model over long documents: inputs {"tokens": (B, N) int, "start_of_sequence": (B,) bool}.

    Its Keras config is the recipe (plus the vocabulary size, batch size and streams), so
    `model.save("m.keras")` and `keras.models.load_model("m.keras")` round-trip on every backend,
    weights and every stream's carried state included.
    """

    def __init__(self, recipe: Recipe | dict, vocab_size: int, batch_size: int | None = None,
                 streams: tuple[str, ...] = STREAMS, **kwargs):
        super().__init__(**kwargs)
        if isinstance(recipe, dict):
            recipe = validate_recipe(recipe)
        self.recipe = recipe
        self.vocab_size = int(vocab_size)
        self.batch_size = batch_size or recipe.data.batch_size
        self.segment_length = recipe.data.segment_length
        self.streams = tuple(streams)
        self.loss_mask_ids = tuple(recipe.model.loss_mask_ids)
        self.stack = _with_dtype_policy(recipe.model.dtype, lambda: DecoderStack(
            **assemble.stack_arguments(recipe, self.vocab_size), name="decoder"))
        self._inference_stream = "predict" if "predict" in self.streams else self.streams[-1]
        self._host_memories = host_memories(self.stack)  # memory layers whose store keeps its memory on the host
        for layer in self._host_memories:
            layer.init_host(self.streams, self.batch_size)
        self.state_vars: dict[str, dict[str, keras.Variable]] = {}
        for stream in self.streams:
            self.state_vars[stream] = {
                key: self.add_weight(shape=shape, dtype=dtype, initializer="zeros", trainable=False,
                                     name=_state_var_name(stream, key))
                for key, (shape, dtype) in self.stack.state_spec(self.batch_size).items()
            }
        self.nats_tracker = keras.metrics.Mean(name="nats_per_token")
        self.bits_tracker = keras.metrics.Mean(name="bits_per_token")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self.scored_tracker = keras.metrics.Sum(name="scored_tokens")  # the weight of the means above

    def build(self, input_shape=None):
        self.stack.build(None)
        self.built = True

    def get_config(self):
        return {"recipe": self.recipe.to_dict(), "vocab_size": self.vocab_size, "batch_size": self.batch_size,
                "streams": list(self.streams), "name": self.name}

    @classmethod
    def from_config(cls, config):
        """Rebuilds the model from its recipe (plugins resolved again by name); weights come after."""
        config = dict(config)
        model = cls(validate_recipe(config.pop("recipe")), streams=tuple(config.pop("streams")), **config)
        model.build()
        return model

    def get_build_config(self):
        return {}

    def build_from_config(self, config):
        self.build()

    # -- state -----------------------------------------------------------------------------------

    def reset_state(self, stream: str | None = None) -> None:
        """Empties the caches, memories and recurrent states of one stream (all streams if None)."""
        for name in [stream] if stream else self.streams:
            for var in self.state_vars[self._check_stream(name)].values():
                var.assign(ops.zeros(var.shape, var.dtype))
            for layer in self._host_memories:
                layer.host_store().reset(name, range(self.batch_size))

    def host_state(self) -> dict[str, np.ndarray]:
        """The state of every host memory store ('<layer path>/<name>' -> array), for checkpoints.

        Empty unless the model has a host store (`meliad_core.host_store`): a checkpoint must save these
        arrays beside `model.variables` and hand them back to `load_host_state` when it restores.
        """
        from meliad_core.host_calls import host_barrier

        host_barrier()  # host calls dispatched by earlier steps have run
        return {f"{layer.path}/{key}": np.asarray(value) for layer in self._host_memories
                for key, value in layer.host_store().state().items()}

    def load_host_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restores what `host_state` returned (every host store's state; missing entries: empty memories)."""
        for layer in self._host_memories:
            prefix = f"{layer.path}/"
            layer.host_store().load_state({key[len(prefix):]: value for key, value in arrays.items()
                                           if key.startswith(prefix)})

    def get_stream_state(self, stream: str) -> dict[str, np.ndarray]:
        """A copy of one stream's state (copied: on torch, numpy views share the variable's storage)."""
        return {key: np.array(keras.ops.convert_to_numpy(var), copy=True) for key, var in self.state_vars[stream].items()}

    # -- forward ---------------------------------------------------------------------------------

    def _tokens(self, inputs):
        """(B, N) token ids with a static segment length (a generator's tf.data spec may not say it)."""
        tokens = inputs["tokens"]
        shape = getattr(tokens, "shape", None)
        rank = None if shape is None else (shape.rank if hasattr(shape, "rank") else len(shape))
        if rank != 2 or shape[1] is None:
            tokens = ops.reshape(tokens, (-1, self.segment_length))
        return tokens

    def call(self, inputs, training: bool = False, stream: str | None = None):
        tokens = self._tokens(inputs)
        sos = ops.reshape(ops.cast(inputs["start_of_sequence"], "bool"), (-1,))
        stream = self._check_stream(stream or ("train" if training else self._inference_stream))
        if tokens.shape[0] is not None and tokens.shape[0] != self.batch_size:
            raise ValueError(f"batch of {tokens.shape[0]} rows, but this model was built for batch_size "
                             f"{self.batch_size}: each row is one document stream, so the batch size is fixed")
        if tokens.shape[1] != self.segment_length:
            raise ValueError(f"segments of {tokens.shape[1]} tokens, but this model was built for "
                             f"segment_length {self.segment_length}")
        variables = self.state_vars[stream]
        state = {key: var.value for key, var in variables.items()}
        logits, new_state = self.stack(tokens, state, sos, training=training, stream=stream)
        for key, var in variables.items():
            var.assign(ops.cast(ops.stop_gradient(new_state[key]), var.dtype))
        return logits

    # -- keras entry points use their own stream ------------------------------------------------------

    def _check_stream(self, stream: str) -> str:
        if stream not in self.state_vars:
            raise ValueError(f"this model keeps no {stream!r} stream; it keeps {', '.join(self.streams)}")
        return stream

    @contextlib.contextmanager
    def inference_stream(self, stream: str):
        """Calls with training=False inside this block use `stream` (traced functions read it once)."""
        previous, self._inference_stream = self._inference_stream, self._check_stream(stream)
        try:
            yield
        finally:
            self._inference_stream = previous

    def compile(self, *args, jit_compile="auto", **kwargs):
        """Keras' compile; `jit_compile="auto"` follows the recipe's `train.compile`.

        What `train.compile` means on each backend (`compile_step` decides; an explicit `jit_compile`
        argument wins over the recipe):
          - jax: the step is always jit-compiled (XLA); true and null change nothing, and false is
            ignored too (an un-jitted JAX step runs op by op, orders of magnitude slower).
          - tensorflow: true = XLA (tf.function(jit_compile=True)), false = a tf.function without XLA,
            null = Keras' "auto" (XLA on a GPU, not on CPU). A host memory store cannot run inside XLA
            (its host call is tf.numpy_function): null then means no XLA, and true is an error.
          - torch: true = torch.compile of the train/eval/predict step, false = eager, null =
            TORCH_COMPILE_DEFAULT.
        """
        if jit_compile == "auto":
            jit_compile = compile_step(keras.backend.backend(), self.recipe.train.compile,
                                       host_store=bool(self._host_memories))
        return super().compile(*args, jit_compile=jit_compile, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self.inference_stream("eval"):
            return super().evaluate(*args, **kwargs)

    def test_on_batch(self, *args, **kwargs):
        with self.inference_stream("eval"):
            return super().test_on_batch(*args, **kwargs)

    def _predict_stream(self):
        """`predict` uses the predict stream; a model built without one keeps its current stream."""
        if "predict" in self.state_vars:
            return self.inference_stream("predict")
        return contextlib.nullcontext()

    def predict(self, *args, **kwargs):
        with self._predict_stream():
            return super().predict(*args, **kwargs)

    def predict_on_batch(self, *args, **kwargs):
        with self._predict_stream():
            return super().predict_on_batch(*args, **kwargs)

    # -- loss and metrics ------------------------------------------------------------------------

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The loss of a segment; it also updates the metrics, from the same per-token nats.

        The cross-entropy over the vocabulary is computed once per step, here: every backend's train and
        test step call compute_loss and then compute_metrics on the same predictions, so the trackers
        are updated here (on JAX inside the differentiated function, whose metric variables Keras
        carries out) and compute_metrics, seeing `_metrics_pending`, only reads them.
        """
        nats, valid, targets = token_losses(self._tokens(x), y_pred, self.loss_mask_ids)
        self._update_token_metrics(y_pred, ops.stop_gradient(nats), valid, targets)
        self._metrics_pending = True
        total = ops.sum(nats)
        if self.recipe.train.loss_reduction == "mean":
            total = total / ops.maximum(ops.sum(valid), 1.0)
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """The metrics' results; computed here only when compute_loss did not just update them."""
        if getattr(self, "_metrics_pending", False):
            self._metrics_pending = False
        else:
            nats, valid, targets = token_losses(self._tokens(x), y_pred, self.loss_mask_ids)
            self._update_token_metrics(y_pred, nats, valid, targets)
        return self.get_metrics_result()

    def _update_token_metrics(self, logits, nats, valid, targets) -> None:
        correct = ops.cast(ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), targets), "float32")
        self.nats_tracker.update_state(nats, sample_weight=valid)
        self.bits_tracker.update_state(nats * LOG2E, sample_weight=valid)
        self.accuracy_tracker.update_state(correct, sample_weight=valid)
        self.scored_tracker.update_state(ops.sum(valid))

    def non_embedding_parameter_count(self) -> int:
        embedding = int(np.prod(self.stack.embedding.shape))
        return sum(int(np.prod(v.shape)) for v in self.trainable_weights) - embedding

    # -- incremental decoding and generation (meliad_core.decoding) ------------------------------

    def decoder(self, compiled: bool = True):
        """This model's `meliad_core.decoding.Decoder` (one per model and mode, made on first use):
        the decoding state and the compiled one-token step."""
        from meliad_core.decoding import Decoder

        decoders = self.__dict__.setdefault("_meliad_decoders", {})
        if compiled not in decoders:
            decoders[compiled] = Decoder(self, compiled=compiled)
        return decoders[compiled]

    def generate(self, prompt_ids, max_tokens: int, sampler="greedy", **kwargs):
        """Samples up to `max_tokens` ids after `prompt_ids`; see `meliad_core.decoding.generate`."""
        from meliad_core.decoding import generate

        return generate(self, prompt_ids, max_tokens, sampler=sampler, **kwargs)


def build_model(recipe: Recipe, vocab_size: int | None = None, batch_size: int | None = None,
                streams: tuple[str, ...] = STREAMS) -> MeliadLM:
    """A built MeliadLM for `recipe` (weights created, states zero).

    The vocabulary size comes from `vocab_size`, else `model.vocab_size`, else the recipe's vocabulary.
    """
    if vocab_size is None:
        vocab_size = recipe.model.vocab_size
    if vocab_size is None:
        from meliad_core.vocab import load_vocabulary

        vocab_size = load_vocabulary(recipe.data).vocab_size
    if recipe.train.seed is not None:
        keras.utils.set_random_seed(recipe.train.seed)
    model = MeliadLM(recipe, vocab_size, batch_size=batch_size, streams=streams, name="meliad_lm")
    model.build()
    batch = batch_size or recipe.data.batch_size
    dummy = {"tokens": np.zeros((batch, recipe.data.segment_length), "int32"),
             "start_of_sequence": np.ones((batch,), bool)}
    model(dummy, training=False, stream=model.streams[0])  # checks the forward pass once
    model.reset_state()
    return model
