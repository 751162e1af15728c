"""Training throughput on a quiet vs a busy machine, per backend and thread setting.

    python benchmarks/threads.py [--backends jax torch tensorflow] [--settings default auto 1]
                                 [--arch xl] [--size tiny_test] [--competitors 1]

For each backend and thread setting (`default`: the framework's own; `auto`: meliad's default from
meliad_core.threads; N: N intra-op threads), one training run with nothing added ("quiet": whatever
else this machine is running, see the load printed) and one with `--competitors` CPU-bound processes
(a Python busy loop each) running alongside; the "kept" column is busy / quiet. The two runs of a
pair are back to back, and each configuration runs in a fresh process (threads are set before the
framework is imported, as meliad's runner does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def one(setting: str, size: str, arch: str, steps: int, intervals: int) -> dict:
    from meliad_core.threads import configure_threads

    applied = configure_threads(setting)  # before Keras (and the framework) is imported
    from throughput import one as run_one

    result = run_one(size, arch, steps, intervals, 2, "auto", None, [])
    result["threads"] = applied.summary()
    return result


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["jax", "torch", "tensorflow"])
    parser.add_argument("--settings", nargs="+", default=["default", "auto"])
    parser.add_argument("--size", default="tiny_test")
    parser.add_argument("--arch", default="xl", choices=("xl", "memorizing", "recurrent"))
    parser.add_argument("--competitors", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--intervals", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.size, args.arch, args.steps, args.intervals)))
        return
    from _common import machine, print_table

    print(f"command: python benchmarks/threads.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}; load at start {load()}")
    rows = []
    for backend in args.backends:
        python = os.environ.get(f"MELIAD_PYTHON_{backend.upper()}", sys.executable)
        for setting in args.settings:
            figures = {}
            for busy in (False, True):
                env = {key: value for key, value in os.environ.items()
                       if key not in ("MELIAD_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_FLAGS",
                                      "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")}
                env["KERAS_BACKEND"] = backend
                hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.competitors if busy else 0)]
                try:
                    time.sleep(0.5 if hogs else 0)
                    start_load = load()
                    proc = subprocess.run([python, __file__, "--one", setting, "--size", args.size, "--arch",
                                           args.arch, "--steps", str(args.steps), "--intervals",
                                           str(args.intervals)], env=env, capture_output=True, text=True)
                finally:
                    for hog in hogs:
                        hog.kill()
                        hog.wait()
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    figures[busy] = (None, start_load, f"failed: {tail[:60]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                figures[busy] = (r["tokens_per_s"], start_load, r["threads"])
            quiet, busy_ = figures[False][0], figures[True][0]
            kept = f"{busy_ / quiet:.0%}" if quiet and busy_ else "-"
            rows.append([backend, setting, figures[False][2], f"{quiet:,.0f}" if quiet else "-",
                         figures[False][1], f"{busy_:,.0f}" if busy_ else "-", figures[True][1], kept])
    print_table(["backend", "setting", "threads", "tokens/s quiet", "load", "tokens/s + busy", "load", "kept"],
                rows)
    print(f"{args.size} {args.arch}, {args.competitors} competing busy-loop process(es) in the busy column")


if __name__ == "__main__":
    main()
