"""Thread settings (meliad_core/threads.py): parsing, defaults, and that each backend gets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import pytest

from meliad_core import threads
from meliad_core.threads import configure_threads, default_threads, parse_threads

BACKEND = keras.backend.backend()
CLEAN = ("MELIAD_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_FLAGS", "TF_NUM_INTRAOP_THREADS",
         "TF_NUM_INTEROP_THREADS")


def _run(code: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in CLEAN}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parse_threads():
    assert parse_threads("auto") == "auto" and parse_threads("") == "auto"
    assert parse_threads("default") == "default" and parse_threads(0) == "default"
    assert parse_threads(3) == (3, None) and parse_threads("2,1") == (2, 1) and parse_threads(" 4 ") == (4, None)
    for bad in ("-1", "two", "1,2,3", "1,0", True):
        with pytest.raises(ValueError, match="MELIAD_THREADS"):
            parse_threads(bad)


def test_defaults_per_backend_and_machine_size():
    assert default_threads("torch", 2) == (1, 1)
    assert default_threads("torch", 1) == (1, 1)
    assert default_threads("tensorflow", 2) == (None, None)
    assert default_threads("jax", 2) == (None, None)
    assert default_threads("torch", 16) == (16, None) and default_threads("tensorflow", 16) == (16, None)
    assert default_threads("jax", 16) == (None, None)


def test_default_setting_changes_nothing(monkeypatch):
    for name in CLEAN:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MELIAD_THREADS", "default")
    settings = configure_threads(backend=BACKEND)
    assert (settings.intra, settings.interop, settings.applied, settings.source) == (None, None, [],
                                                                                     "MELIAD_THREADS")


def test_importing_and_configuring_imports_no_framework():
    got = _run("import sys, json\n"
               "from meliad_core.threads import configure_threads\n"
               "s = [configure_threads(1, backend=b).applied for b in ('jax', 'torch', 'tensorflow')]\n"
               "print(json.dumps({'mods': sorted(m for m in ('jax', 'torch', 'tensorflow', 'keras')"
               " if m in sys.modules), 'applied': s}))", KERAS_BACKEND=BACKEND)
    assert got["mods"] == []
    assert got["applied"] == [["XLA_FLAGS=--xla_cpu_multi_thread_eigen=false"],
                              ["OMP_NUM_THREADS=1", "OMP_WAIT_POLICY=PASSIVE"],
                              ["TF_NUM_INTRAOP_THREADS=1"]]


def test_set_before_import_reaches_the_framework():
    """MELIAD_THREADS=1 set before Keras is imported: the framework runs with one intra-op thread."""
    probe = {"torch": "import torch; n = torch.get_num_threads()",
             # TF reads TF_NUM_INTRAOP_THREADS when its runtime starts (tf.config does not report it)
             "tensorflow": "import os; n = int(os.environ['TF_NUM_INTRAOP_THREADS'])",
             "jax": "import os; n = 1 if 'multi_thread_eigen=false' in os.environ['XLA_FLAGS'] else 0"}[BACKEND]
    got = _run("import json\nfrom meliad_core.threads import configure_threads\n"
               "s = configure_threads()\nimport keras\n" + probe + "\n"
               "import keras.ops as ops; float(ops.sum(ops.ones((3,))))\n"
               "print(json.dumps({'n': n, 'summary': s.summary()}))", KERAS_BACKEND=BACKEND, MELIAD_THREADS="1")
    assert got["n"] == 1, got
    assert "MELIAD_THREADS" in got["summary"]


def test_after_the_framework_started_it_applies_what_it_can_and_never_raises():
    import keras.ops as ops

    float(ops.sum(ops.ones((3,))))  # the framework has started
    if BACKEND == "torch":
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(2)  # an earlier test may have set 1 already: start from something to change
        try:
            settings = configure_threads("1,1")
            assert torch.get_num_threads() == 1 and "torch.set_num_threads(1)" in settings.applied
        finally:
            torch.set_num_threads(before)
    elif BACKEND == "jax":
        settings = configure_threads(1)
        assert settings.notes or threads._JAX_ONE_THREAD in os.environ.get("XLA_FLAGS", "")
    else:
        settings = configure_threads("1,1")
        assert settings.applied or settings.notes  # TF refuses once started: reported, not raised
    assert settings.summary().startswith(f"threads ({BACKEND}, argument)")
