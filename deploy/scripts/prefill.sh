#!/usr/bin/env bash
# Starts the MoRI-IO prefill instance of a P/D deployment with `vllm serve`: see --help, and
# deploy/README.md for the recipes. The logic is shared with the other role's script
# (lib/common.sh) and with the Kubernetes pods (moriio-vllm.sh).
set -euo pipefail
PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
run_instance PREFILL "$@"
