#!/usr/bin/env bash
# peft's LoRA test suite against lorakit. Not part of the default test run (it is large).
#   benchmarks/peft_suite/run.sh PEFT_GIT_DIR [pytest args...]
# PEFT_GIT_DIR: a git directory (clone or mirror) of huggingface/peft. The test files are
# exported into benchmarks/peft_suite/tests/ (git-ignored) next to this folder's conftest.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -lt 1 ]; then echo "usage: $0 PEFT_GIT_DIR [pytest args...]" >&2; exit 2; fi
git_dir="$1"; shift
work="$here/tests"
rm -rf "$work" && mkdir -p "$work"
for f in test_custom_models.py test_initialization.py test_config.py test_other.py \
         testing_common.py testing_utils.py; do
  git --git-dir="$git_dir" show "HEAD:tests/$f" > "$work/$f"
done
touch "$work/__init__.py"  # peft's tests import their helpers relatively
cd "$here"
HF_HUB_OFFLINE=1 PYTHONPATH="$here/../../src:${PYTHONPATH:-}" timeout "${PEFT_SUITE_TIMEOUT:-3600}" \
  python -m pytest -q -p no:cacheprovider -o addopts="" --rootdir "$here" -rN "$@" tests | tail -5
