"""Shared helpers of the benchmark scripts: machine description, backend memory probes, tables."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time





def machine() -> str:
    """One line naming the CPU (or GPU) this ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            gpu = f", GPU {out.stdout.strip().splitlines()[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{os.cpu_count()} x {cpu}{gpu}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"


def accelerator_in_use() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "jax":
        import jax

        return jax.devices()[0].platform
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    return "cpu"


def reset_peak_memory() -> None:
    import keras

    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def peak_memory_mib() -> float:
    """Peak device memory on a GPU; on the CPU, the process's peak resident set size."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")


def time_training(model, make_batch, steps: int, intervals: int, warmup: int) -> float:
    """Seconds per train_on_batch step: the median over `intervals` timed runs of `steps` steps,
    after `warmup` steps. `make_batch(i)` returns the i-th input batch (made outside the timing)."""
    import statistics

    reset_peak_memory()
    for i in range(warmup):
        model.train_on_batch(make_batch(i))
    times = []
    for _ in range(intervals):
        batches = [make_batch(warmup + i) for i in range(steps)]
        start = time.perf_counter()
        for x in batches:
            logs = model.train_on_batch(x, return_dict=True)
        float(logs["loss"])  # waits for the device
        times.append(time.perf_counter() - start)
    return statistics.median(times) / steps
