"""Incremental decoding: one token at a time, with the XL cache, the kNN memory and the recurrent state live.

    decoder = model.decoder()                    # a Decoder for this MeliadLM (cached on the model)
    logits = decoder.feed(prompt_ids)            # (B, T, V); whole segments go through the segment path
    logits = decoder.step(next_ids)              # (B, V): one token per batch row, compiled, state in place
    ids = model.generate(prompt_ids, max_tokens=200, sampler="top_p", sampler_options={"p": 0.9}, seed=0)

The decoding state is a set of preallocated buffers (non-trainable variables of a small Keras model that
shares the MeliadLM's layers), updated in place each step with `where`/`cond`, never grown:

- windowed attention: a (B, K, H, D) key/value buffer, [previous window | current window] (K = 2W with
  the XL cache); at each window start the current window becomes the previous one (zeros for rows that
  start a document), and token i of a window attends through row i of the segment path's mask and bias;
- kNN memory: the memory (B, H, M, D) as `call` keeps it, queried by every token as it was at the
  segment's start, and a pending (B, H, N, D) buffer of the segment's keys and values, written into the
  memory when the segment's last token has been decoded (whole segments, as in training). A host
  memory store (`exact_host`, `hnsw`) keeps the memory itself, in host RAM: each token's queries reach
  it through a host call (`meliad_core.host_calls`), and the pending segment is written there at the
  same boundary. Its memory is that of the model's inference stream ("predict"), which the segment
  path in `feed` also reads and writes; `get_state` includes it (keys 'host/...');
- block recurrence: the state at the current window's start and its keys and values, read by every
  token of the window; the state steps once at the window's last token, with the window's keys;
- one position counter (the position in the segment of the next token), shared by the batch rows.

Semantics equal the segment path exactly: teacher-forcing a text through `step` gives the logits
`model(...)` gives on the same text cut into segments (tests/test_decoding.py), with start_of_sequence
taking effect at a segment's first token. The step is compiled the way Keras compiles `predict_on_batch`
(jax.jit with the state donated, tf.function on TensorFlow — without XLA when a host store is called —,
eager on PyTorch, where `DecodingModel.lean` skips the layer-call machinery around the step and the
copies of unchanged state, e.g. the whole kNN memory between writes: a few percent of a token's CPU
time, `benchmarks/generate.py --before-after`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

POSITION = "position"
HOST = "host/"  # get_state keys of the host memory stores


def _var_name(key: str) -> str:
    return "decode_" + key.replace("/", "_")


class DecodingModel(keras.Model):
    """The compiled decoding step: inputs {"tokens": (B, 1) int, "start_of_sequence": (B,) bool},
    output logits (B, V); the decoding state lives in this model's non-trainable variables."""

    def __init__(self, stack, batch_size: int, segment_length: int, **kwargs):
        super().__init__(**kwargs)
        self.stack = stack  # shared with the MeliadLM: the same weights
        self.batch_size, self.segment_length = int(batch_size), int(segment_length)
        self.spec = stack.decode_spec(self.batch_size, self.segment_length)
        self.state_vars = {key: self.add_weight(shape=shape, dtype=dtype, initializer="zeros", trainable=False,
                                                name=_var_name(key)) for key, (shape, dtype) in self.spec.items()}
        self.position = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False,
                                        name="decode_position")
        self.lean = True  # False: the plain Keras path (every state variable assigned, the layer's __call__)
        self.built = True

    def call(self, inputs, training=False):
        tokens = ops.reshape(ops.cast(inputs["tokens"], "int32"), (self.batch_size, 1))
        start = ops.reshape(ops.cast(inputs["start_of_sequence"], "bool"), (self.batch_size,))
        position = ops.convert_to_tensor(self.position.value)
        state = {key: var.value for key, var in self.state_vars.items()}
        logits, new_state = self.stack.decode_step(tokens, state, position, start, self.segment_length)
        for key, var in self.state_vars.items():
            new = new_state[key]
            if self.lean and new is state[key]:
                continue  # unchanged (e.g. the memory between writes): eager torch would copy it every token
            var.assign(ops.cast(new, var.dtype))
        self.position.assign((position + 1) % self.segment_length)
        return logits[:, 0]

    def predict_step(self, *args):
        """On eager PyTorch the step calls `call` directly, inside Keras' no-grad predict function: the
        layer-call machinery around it (input conversion, masks, scopes) costs time every token.
        (JAX's predict_step takes (state, data); TensorFlow's and torch's take (data,).)"""
        if self.lean and keras.backend.backend() == "torch":
            data = args[-1]
            return self.call(data[0] if isinstance(data, tuple) else data)
        return super().predict_step(*args)


class Decoder:
    """The decoding state of a MeliadLM and the step that advances it (see the module docstring).

    `position` is the position in the current segment of the next token (0 at a segment boundary).
    A row's document starts where `start_of_sequence` is set, which takes effect at position 0 only
    (documents own whole segments, as in training); `reset()` starts every row afresh at a boundary.
    """

    def __init__(self, model, compiled: bool = True):
        self.model = model
        self.batch_size, self.segment_length = model.batch_size, model.segment_length
        self.vocab_size = model.vocab_size
        # host memory stores keep one memory per stream: the decoder's is the inference stream's, so that
        # the segment path (`feed`) and the token step read and write the same memory
        self.host_memories = list(model._host_memories)
        self.host_stream = model._inference_stream
        for layer in self.host_memories:
            layer.decode_stream = self.host_stream
        self.net = DecodingModel(model.stack, self.batch_size, self.segment_length, name="meliad_decoder")
        jit = "auto" if compiled else False
        if self.host_memories and keras.backend.backend() == "tensorflow":
            jit = False  # the host call (tf.numpy_function) cannot run inside XLA
        self.net.compile(jit_compile=jit)
        self.compiled = compiled
        self.position = 0
        self._pending_start = np.ones((self.batch_size,), bool)

    # -- state -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty state at a segment boundary; the next token starts a document in every row."""
        for var in self.net.state_vars.values():
            var.assign(ops.zeros(var.shape, var.dtype))
        if self.host_memories:
            from meliad_core.host_calls import host_barrier

            host_barrier()  # host calls of earlier steps have run
            for layer in self.host_memories:
                layer.host_store().reset(self.host_stream, range(self.batch_size))
        self._set_position(0)
        self._pending_start = np.ones((self.batch_size,), bool)

    def _set_position(self, position: int) -> None:
        self.position = int(position)
        self.net.position.assign(np.asarray(position, "int32"))

    def get_state(self) -> dict[str, np.ndarray]:
        """A copy of the decoding state ('transformer{i}/name' arrays, plus 'position'; with a host
        memory store also 'host/<layer path>/<name>': the host stores' state, every stream's)."""
        out = {key: np.array(ops.convert_to_numpy(var), copy=True) for key, var in self.net.state_vars.items()}
        out[POSITION] = np.asarray(self.position, "int32")
        if self.host_memories:
            out.update({HOST + key: np.array(value, copy=True) for key, value in self.model.host_state().items()})
        return out

    def set_state(self, state: dict) -> None:
        """Restores a state from `get_state`."""
        for key, var in self.net.state_vars.items():
            var.assign(np.asarray(state[key]).astype(str(var.dtype)))
        if self.host_memories:
            from meliad_core.host_calls import host_barrier

            host_barrier()
            self.model.load_host_state({key[len(HOST):]: value for key, value in state.items()
                                        if key.startswith(HOST)})
        self._set_position(int(state[POSITION]))
        self._pending_start = np.zeros((self.batch_size,), bool)

    def _check_host_stream(self, stream: str) -> None:
        if self.host_memories and stream != self.host_stream:
            raise ValueError(f"stream {stream!r}: the memory store {self.host_memories[0].store_name!r} keeps "
                             f"its memory on the host, and the decoder reads and writes the {self.host_stream!r} "
                             f"stream's memory there; it can continue only the {self.host_stream!r} stream")

    def load_stream(self, stream: str = "predict") -> None:
        """Continues the documents the model's `stream` has been reading (its caches, memories and
        states after the last segment it was called on): the decoder sits at a segment boundary.
        With a host memory store only the decoder's own stream (`host_stream`) can be continued."""
        self._check_host_stream(stream)
        state = {key: var.value for key, var in self.model.state_vars[self.model._check_stream(stream)].items()}
        decoded = self.model.stack.decode_state(state, self.batch_size, self.segment_length)
        for key, var in self.net.state_vars.items():
            var.assign(ops.cast(decoded[key], var.dtype))
        self._set_position(0)
        self._pending_start = np.zeros((self.batch_size,), bool)

    def store_stream(self, stream: str = "predict") -> None:
        """Writes the decoding state into the model's `stream` (at a segment boundary only)."""
        if self.position != 0:
            raise ValueError(f"the decoder is at position {self.position} of a segment; the segment path "
                             "carries state between whole segments only")
        self._check_host_stream(stream)
        state = {key: var.value for key, var in self.net.state_vars.items()}
        carried = self.model.stack.carried_state(state, self.batch_size)
        for key, var in self.model.state_vars[self.model._check_stream(stream)].items():
            var.assign(ops.cast(carried[key], var.dtype))

    # -- stepping --------------------------------------------------------------------------------

    def _rows(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim == 0:
            tokens = tokens[None]
        if tokens.shape[0] != self.batch_size:
            if tokens.shape[0] == 1:
                tokens = np.repeat(tokens, self.batch_size, axis=0)
            else:
                raise ValueError(f"{tokens.shape[0]} rows, but the model decodes {self.batch_size} document streams")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {tokens.min()}..{tokens.max()}")
        return tokens.astype("int32")

    def _start(self, start_of_sequence) -> np.ndarray:
        start = self._pending_start if start_of_sequence is None else np.broadcast_to(
            np.asarray(start_of_sequence, bool), (self.batch_size,))
        self._pending_start = np.zeros((self.batch_size,), bool)
        if start.any() and self.position != 0:
            raise ValueError(f"a document can start only at a segment boundary; the decoder is at position "
                             f"{self.position} of {self.segment_length} (call reset() to start afresh)")
        return np.array(start, bool)

    def step(self, tokens, start_of_sequence=None) -> np.ndarray:
        """One token per row, (B,) ints (or one id for every row). Returns the next-token logits (B, V)."""
        inputs = {"tokens": self._rows(tokens).reshape(self.batch_size, 1), "start_of_sequence": self._start(
            start_of_sequence)}
        if self.compiled:
            logits = self.net.predict_on_batch(inputs)
        else:
            logits = self.net(inputs)
        self.position = (self.position + 1) % self.segment_length
        return np.asarray(ops.convert_to_numpy(logits))

    def feed(self, tokens, start_of_sequence=None, segment_path: bool = True, all_logits: bool = True) -> np.ndarray:
        """Consumes (B, T) tokens (or (T,) for every row), e.g. a prompt or a short chunk: whole segments
        at a segment boundary with the segment path (the model's compiled `predict_on_batch` on its
        inference stream, "predict" when it keeps one; that stream's state is overwritten), the rest
        token by token. Returns the logits (B, T, V), or only the last token's (B, V) with all_logits=False."""
        tokens = np.asarray(tokens)
        tokens = self._rows(tokens[None] if tokens.ndim == 1 else tokens)
        n, total = self.segment_length, tokens.shape[1]
        stream = self.model._inference_stream
        outputs, i = [], 0
        start = start_of_sequence
        while i < total:
            if segment_path and self.position == 0 and total - i >= n:
                sos = self._start(start)
                self.store_stream(stream)
                logits = self.model.predict_on_batch({"tokens": tokens[:, i:i + n], "start_of_sequence": sos})
                self.load_stream(stream)
                logits, i = np.asarray(logits), i + n
            else:
                logits, i = self.step(tokens[:, i], start)[:, None], i + 1
            start = None
            outputs.append(logits if all_logits else logits[:, -1:])
            if not all_logits:
                outputs = outputs[-1:]
        if not outputs:
            raise ValueError("nothing to feed: no tokens")
        out = np.concatenate(outputs, axis=1)
        return out if all_logits else out[:, -1]


def generate(model, prompt_ids, max_tokens: int, sampler="greedy", sampler_options: dict | None = None,
             seed: int | None = None, stop_ids=(), new_document: bool = True, from_stream: str | None = None,
             banned_ids=(0,), on_tokens=None, decoder: Decoder | None = None) -> np.ndarray:
    """Samples up to `max_tokens` tokens after `prompt_ids` ((T,) for every row, or (B, T)).

    sampler: a name registered through `meliad_register_samplers` (greedy, temperature, top_k, top_p)
    with `sampler_options`, or an object with `sample(logits, rng)`. seed: the sampler's random
    generator. A row stops after emitting one of `stop_ids` (the stop id is included); generation ends
    when every row has stopped or after max_tokens. new_document: the prompt starts a new document
    (state reset); False continues the decoder's documents, and from_stream="predict" first takes the
    state of a stream the model has been reading with the segment path. banned_ids are never sampled
    (padding). on_tokens(ids (B,)) is called with every sampled token (streaming).
    Returns the sampled ids, (B, n) int32 (n ≤ max_tokens), or (n,) for a (T,) prompt and batch size 1.
    """
    from meliad_core import assemble

    if int(max_tokens) < 0:
        raise ValueError(f"max_tokens: got {max_tokens}, expected a number >= 0")
    prompt = np.asarray(prompt_ids)
    flat = prompt.ndim == 1
    if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
        raise ValueError("prompt_ids: expected a non-empty (T,) or (B, T) array of token ids")
    if isinstance(sampler, str):
        sampler = assemble.sampler(sampler, sampler_options)
    decoder = decoder or model.decoder()
    if from_stream is not None:
        decoder.load_stream(from_stream)
        new_document = False
    if new_document:
        decoder.reset()
    logits = decoder.feed(prompt, all_logits=False)
    rng = np.random.default_rng(seed)
    stops = np.asarray(list(stop_ids), "int64")
    banned = [i for i in banned_ids if 0 <= i < logits.shape[-1]]
    done = np.zeros((decoder.batch_size,), bool)
    out = []
    for t in range(int(max_tokens)):
        logits = np.array(logits, dtype=np.float32)
        if banned:
            logits[:, banned] = -np.inf
        ids = np.asarray(sampler.sample(logits, rng), dtype=np.int64).reshape(-1)
        ids = np.where(done, 0, ids)
        out.append(ids)
        if on_tokens is not None:
            on_tokens(ids)
        done |= np.isin(ids, stops)
        if done.all() or t == int(max_tokens) - 1:
            break
        logits = decoder.step(ids.astype("int32"))
    result = np.stack(out, axis=1).astype("int32") if out else np.zeros((decoder.batch_size, 0), "int32")
    return result[0] if flat and decoder.batch_size == 1 else result
