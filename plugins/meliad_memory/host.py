"""`exact_host`: exact top-k over a memory kept in host RAM (numpy), the reference host store.

It is what a host store looks like (the lifecycle of `meliad_core.extend.HostMemoryStore`) without
an index: every query is scored against every filled slot of its (stream, row, head) memory. It
needs no extra library, so the suite tests the host path (`meliad_core.host_calls`) with it on every
backend; `meliad_hnswlib` (a separate distribution) is the fast, approximate one.
"""

from __future__ import annotations

import numpy as np

from meliad_core.extend import FifoRing, HostMemoryStore, top_k_rows


class ExactHostStore(HostMemoryStore):
    def init(self, streams, batch, heads, dim, options, *, size):
        self.batch, self.heads, self.dim, self.size = batch, heads, dim, size
        self.rings = {stream: FifoRing(batch, heads, dim, size) for stream in streams}

    def _ring(self, stream):
        if stream not in self.rings:
            self.rings[stream] = FifoRing(self.batch, self.heads, self.dim, self.size)
        return self.rings[stream]

    def reset(self, stream, rows):
        self._ring(stream).reset(rows)

    def write(self, stream, keys, values):
        self._ring(stream).write(keys, values)

    def retrieve(self, stream, queries, k):
        ring = self._ring(stream)
        b_, h_, n, d = queries.shape
        keys = np.zeros((b_, h_, n, k, d), np.float32)
        values = np.zeros_like(keys)
        if ring.keys is None:
            return keys, values
        for b in range(b_):
            filled = ring.filled(b)
            if filled == 0:
                continue
            scores = np.einsum("hnd,hmd->hnm", queries[b], ring.keys[b, :, :filled])
            idx = top_k_rows(scores, k)  # (H, N, k') slots, k' = min(k, filled)
            heads = np.arange(h_)[:, None, None]
            keys[b, :, :, :idx.shape[-1]] = ring.keys[b][heads, idx]
            values[b, :, :, :idx.shape[-1]] = ring.values[b][heads, idx]
        return keys, values

    def state(self):
        out = {}
        for stream, ring in self.rings.items():
            out.update(ring.state(f"{stream}/"))
        return out

    def load_state(self, state):
        streams = {key.split("/", 1)[0] for key in state}
        for stream in streams:
            self._ring(stream).load_state(state, f"{stream}/")
