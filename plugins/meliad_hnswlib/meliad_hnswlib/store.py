"""The `hnsw` store: per (stream, row, head) HNSW sub-indexes over a FIFO ring in host RAM.

Layout of one (stream, row): a raw ring of `size + block` slots (`block = size / blocks`), split
into `blocks + 1` blocks; entry number c (counted from the row's last reset) lives at slot
c % (size + block). Each (row, head) has one hnswlib index per block that holds entries; labels are
slot numbers. Writing a segment inserts it into the current block's index (a new index when the
segment starts the block) and `mark_deleted`s the entries that leave the FIFO window (the last
`size` entries), which always lie in the block after the current one. Nothing is ever updated in
place (hnswlib's update is ~10x slower than an insert) and the memory is never wiped as a whole.
"""

from __future__ import annotations

import os

import numpy as np

from meliad_core.extend import FifoRing, HostMemoryStore, PluginError, top_k_rows

SEED = 0


def _hnswlib():
    try:
        import hnswlib
    except ImportError:
        raise PluginError("memory store 'hnsw' needs hnswlib: pip install hnswlib==0.8.0") from None
    return hnswlib


class _Stream:
    def __init__(self, batch, heads, dim, capacity):
        self.ring = FifoRing(batch, heads, dim, capacity)
        self.indexes = [[{} for _ in range(heads)] for _ in range(batch)]  # [row][head] {block: Index}
        self.live = [{} for _ in range(batch)]  # [row] {block: live entries}


class HnswStore(HostMemoryStore):
    def __init__(self, ef_search=128, ef_construction=64, links=16, blocks=4, threads=0):
        self.ef_search, self.ef_construction, self.links = ef_search, ef_construction, links
        self.blocks, self.threads = blocks, threads

    def configure(self, options):
        return HnswStore(**options)

    # -- lifecycle ------------------------------------------------------------------------------

    def init(self, streams, batch, heads, dim, options, *, size):
        self.hnswlib = _hnswlib()
        if size % self.blocks:
            raise PluginError(f"memory store 'hnsw': memory.size {size} is not a multiple of "
                              f"memory.options.blocks {self.blocks}")
        self.batch, self.heads, self.dim, self.size = batch, heads, dim, size
        self.block = size // self.blocks
        self.capacity = size + self.block
        self.query_threads = self.threads or (os.cpu_count() or 1)
        self.streams = {}
        for stream in streams:
            self._stream(stream)

    def _stream(self, stream) -> _Stream:
        if stream not in self.streams:
            self.streams[stream] = _Stream(self.batch, self.heads, self.dim, self.capacity)
        return self.streams[stream]

    def reset(self, stream, rows):
        s = self._stream(stream)
        s.ring.reset(rows)
        for row in rows:
            s.indexes[row] = [{} for _ in range(self.heads)]
            s.live[row] = {}

    def _new_index(self):
        index = self.hnswlib.Index(space="ip", dim=self.dim)
        index.init_index(max_elements=self.block, M=self.links, ef_construction=self.ef_construction,
                         random_seed=SEED)
        index.set_num_threads(1)
        index.set_ef(self.ef_search)
        return index

    def _insert(self, s: _Stream, row: int, first: int, keys) -> None:
        """Inserts entries first, first+1, ... (keys (H, n, D)) into their block's indexes, then evicts."""
        n = keys.shape[1]
        if self.block % n:
            raise PluginError(f"memory store 'hnsw': a block of {self.block} entries (memory.size / "
                              f"memory.options.blocks) is not a multiple of the {n} entries written per segment")
        slot = first % self.capacity
        block, offset = divmod(slot, self.block)
        labels = np.arange(slot, slot + n, dtype=np.int64)
        if offset == 0:
            for h in range(self.heads):
                s.indexes[row][h][block] = self._new_index()
            s.live[row][block] = 0
        for h in range(self.heads):
            s.indexes[row][h][block].add_items(keys[h], labels, num_threads=1)
        s.live[row][block] += n
        # the entries that leave the window of the last `size`: first - size ... first + n - 1 - size
        gone = first + n - self.size
        if gone > 0:
            old_first = max(0, first - self.size)
            old_slot = old_first % self.capacity
            old_block = old_slot // self.block
            old_labels = np.arange(old_slot, old_slot + (first + n - self.size - old_first), dtype=np.int64)
            for h in range(self.heads):
                index = s.indexes[row][h][old_block]
                for label in old_labels:
                    index.mark_deleted(int(label))
            s.live[row][old_block] -= len(old_labels)

    def write(self, stream, keys, values):
        s = self._stream(stream)
        first = s.ring.write(keys, values)
        for row in range(self.batch):
            self._insert(s, row, int(first[row]), keys[row])

    def retrieve(self, stream, queries, k):
        s = self._stream(stream)
        b_, h_, n, d = queries.shape
        keys = np.zeros((b_, h_, n, k, d), np.float32)
        values = np.zeros_like(keys)
        for row in range(b_):
            live = {block: count for block, count in s.live[row].items() if count > 0}
            if not live:
                continue
            for h in range(h_):
                labels, scores = [], []
                for block, count in sorted(live.items()):
                    got, dist = self._search(s.indexes[row][h][block], queries[row, h], min(k, count))
                    labels.append(got)
                    scores.append(1.0 - dist)  # hnswlib's "ip" distance is 1 - q.k
                labels = np.concatenate(labels, axis=1).astype(np.int64)
                best = top_k_rows(np.concatenate(scores, axis=1), k)
                picked = np.take_along_axis(labels, best, axis=1)  # (N, k') slots
                keys[row, h, :, :picked.shape[1]] = s.ring.keys[row, h][picked]
                values[row, h, :, :picked.shape[1]] = s.ring.values[row, h][picked]
        return keys, values

    def _search(self, index, queries, k):
        try:
            return index.knn_query(queries, k=k, num_threads=self.query_threads)
        except RuntimeError:  # hnswlib found fewer than k live neighbours for some query: ask for fewer
            for fewer in range(k - 1, 0, -1):
                try:
                    return index.knn_query(queries, k=fewer, num_threads=self.query_threads)
                except RuntimeError:
                    continue
            return np.zeros((len(queries), 0), np.uint64), np.zeros((len(queries), 0), np.float32)

    # -- checkpoints: the raw rings; indexes are replayed from them ---------------------------------

    def state(self):
        out = {}
        for stream, s in self.streams.items():
            out.update(s.ring.state(f"{stream}/"))
        return out

    def load_state(self, state):
        for stream in sorted({key.split("/", 1)[0] for key in state}):
            s = self._stream(stream)
            s.ring.load_state(state, f"{stream}/")
            for row in range(self.batch):
                s.indexes[row] = [{} for _ in range(self.heads)]
                s.live[row] = {}
                self._replay(s, row)

    def _replay(self, s: _Stream, row: int) -> None:
        """Rebuilds a row's indexes exactly as the writes since its reset left them.

        Each live index was created at the start of its block and then only received inserts
        (single-threaded, fixed seed) followed by deletions, so inserting the same keys in the same
        order and deleting the same labels gives the same graph.
        """
        total = int(s.ring.count[row])
        if total == 0 or s.ring.keys is None:
            return
        # the newest index of each block: created at the last entry number c0 <= total - 1 with c0 % capacity == start
        for block in range(self.blocks + 1):
            start = block * self.block
            c0 = ((total - 1 - start) // self.capacity) * self.capacity + start
            if c0 < 0:
                continue
            end = min(c0 + self.block, total)
            labels = np.arange(start, start + end - c0, dtype=np.int64)
            deleted = max(0, min(end, total - self.size) - c0)
            if deleted == end - c0:
                continue  # every entry gone: the live run keeps an empty index, which retrieval skips
            for h in range(self.heads):
                index = self._new_index()
                index.add_items(s.ring.keys[row, h, labels], labels, num_threads=1)
                for label in labels[:deleted]:
                    index.mark_deleted(int(label))
                s.indexes[row][h][block] = index
            s.live[row][block] = end - c0 - deleted
