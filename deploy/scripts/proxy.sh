#!/usr/bin/env bash
# Starts `moriio-proxy serve` for a P/D deployment on bare metal: see --help, and
# deploy/README.md for the recipes.
set -euo pipefail
PROG=$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
run_proxy "$@"
