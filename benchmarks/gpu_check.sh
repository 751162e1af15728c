#!/usr/bin/env bash
# The GPU check run on a lent accelerator (see README "Benchmarks"): fast kernels against the
# reference on the GPU, the golden-file and invariant tests on the GPU, and throughput figures.
# Expects .whl/ to hold keras, namex, optree and the meliad wheel (the GPU machine has no network).
set -u
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/plugins:$PWD/backends:$SITE PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import keras; print('keras', keras.__version__)"
section() { echo; echo "== $*"; }
section "torch kernels"
KERAS_BACKEND=torch timeout 120 $PY benchmarks/kernels.py --repeats 10
section "torch: kernel, golden and invariant tests on the GPU"
KERAS_BACKEND=torch timeout 150 $PY -m pytest -q -p no:warnings -p no:cacheprovider tests/test_kernels.py tests/test_golden.py tests/test_model_invariants.py 2>&1 | tail -5
section "jax: golden tests on the GPU (highest matmul precision)"
JAX_DEFAULT_MATMUL_PRECISION=highest KERAS_BACKEND=jax timeout 150 $PY -m pytest -q -p no:warnings -p no:cacheprovider tests/test_golden.py 2>&1 | tail -5
section "throughput, torch (auto kernel = torch_sdpa)"
KERAS_BACKEND=torch timeout 150 $PY benchmarks/throughput.py --backend torch --sizes small_test --batch-size 8
section "throughput, torch, reference kernel"
KERAS_BACKEND=torch timeout 100 $PY benchmarks/throughput.py --backend torch --sizes small_test --batch-size 8 --archs xl --kernel reference
section "throughput, jax"
KERAS_BACKEND=jax timeout 150 $PY benchmarks/throughput.py --backend jax --sizes small_test --batch-size 8
section "memorizing layer with a 32k memory, batch 8, torch"
KERAS_BACKEND=torch timeout 100 $PY benchmarks/throughput.py --backend torch --sizes small_test --batch-size 8 --archs memorizing --set memory.size=32768
