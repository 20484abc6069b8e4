#!/usr/bin/env bash
# The first run on a GPU machine (H100/H200, PyTorch + CUDA, transformers, Triton; no network):
# one script, under 8 minutes, one table at the end.
#
#   bash benchmarks/device_check.sh              # on the GPU machine
#   bash benchmarks/device_check.sh --dry-run    # anywhere: the same steps, tiny, on the CPU
#
# Steps: (1) the environment (GPU, torch, CUDA, transformers, Triton); peft installed from
# wheels carried in (wheels/ or $WHEELS, pip --no-index) when it is missing; (2) the tests
# marked `gpu`; (3) benchmarks/bench_device.py: bf16 training (lorakit, + train.compile, peft,
# peft + torch.compile, lorakit QLoRA NF4) and greedy decoding against peft, on the built-in
# model and a 0.5B-shaped random model. Each step has its own time limit, so one that hangs
# cannot take the rest of the budget. --dry-run runs every step on the CPU with a tiny model
# and one step, to check the script itself.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
WHEELS=${WHEELS:-wheels}
START=$(date +%s)
status=0

step() { echo; echo "=== $* ($(($(date +%s) - START)) s in)"; }

step "1/3 environment"
"$PY" - <<'PYEOF' || status=1
import importlib.util, platform
import torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__,
      "| transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "(no GPU)")
print("triton", importlib.util.find_spec("triton") is not None,
      "| peft", importlib.util.find_spec("peft") is not None)
PYEOF
if ! "$PY" -c "import peft" 2>/dev/null; then
    if [ -d "$WHEELS" ]; then
        "$PY" -m pip install --no-index --find-links "$WHEELS" peft || status=1
    else
        echo "peft missing and no $WHEELS/ folder of wheels: the peft rows will fail"
    fi
fi

step "2/3 tests marked gpu"
if [ $DRY = 1 ]; then
    timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only \
        tests/quant/test_codes.py | tail -1 || status=1
else
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests | tail -15 || status=1
fi

step "3/3 training and decoding against peft"
if [ $DRY = 1 ]; then
    timeout 120 "$PY" benchmarks/bench_device.py --device cpu --models tiny --steps 1 \
        --rows 1 --new-tokens 4 --no-compile || status=1
else
    timeout 330 "$PY" benchmarks/bench_device.py --device cuda --models builtin,random-0.5b \
        --steps 5 || status=1
fi

step "done, status $status"
exit $status
