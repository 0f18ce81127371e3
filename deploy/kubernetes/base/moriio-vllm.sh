#!/usr/bin/env bash
# moriio-vllm.sh: check, print and run ONE vLLM instance with the MoRI-IO KV connector,
# configured by MORIIO_* environment variables (see --help).
#
# prefill.sh and decode.sh (bare metal) call this after their deployment-wide checks. The
# Kubernetes pods run an identical copy, deploy/kubernetes/base/moriio-vllm.sh (kustomize
# cannot load a file from outside its directory); tests/deploy checks the two are the same
# file, so edit this one and copy it there.
set -euo pipefail

PROG=${MORIIO_PROG:-$(basename "$0")}

usage() {
  cat <<'EOF'
Usage: moriio-vllm.sh [--dry-run] [-- EXTRA_VLLM_ARGS...]

Builds `vllm serve` for one MoRI-IO prefill (P) or decode (D) instance, generates its
--kv-transfer-config JSON, prints the command as one shell-quoted line on stdout, then
runs it (--dry-run: prints only). Errors: one line on stderr, exit status 2.

Environment (required unless a default is shown):
  MORIIO_ROLE              P (kv_producer) or D (kv_consumer)
  MORIIO_MODEL             model name or path given to `vllm serve`
  MORIIO_HOST_IP           IP address of this instance (host_ip; peers and the proxy use it)
  MORIIO_HTTP_PORT         vLLM's --port; http_port is always the same value
  MORIIO_HANDSHAKE_PORT    MoRI-IO handshake base port (uses dp_size*tp_size ports)
  MORIIO_NOTIFY_PORT       MoRI-IO notify base port (uses dp_size*tp_size ports)
  MORIIO_DP_SIZE=1         --data-parallel-size
  MORIIO_TP_SIZE=1         --tensor-parallel-size (DP>1 with TP>1 is refused: vLLM 0.32
                           gives both the same MoRI-IO ports)
  MORIIO_TRANSFER_MODE=READ  READ (read_mode "true") or WRITE (read_mode omitted); the same
                           on every P and D
  MORIIO_BACKEND=rdma      rdma, or xgmi (P and D on one node)
  MORIIO_BLOCK_SIZE=16     --block-size; the same on every P and D
  MORIIO_DISCOVERY=zmq     zmq: heartbeat to the proxy (needs MORIIO_PROXY_IP);
                           kubernetes: no heartbeat, the proxy watches the pods
  MORIIO_PROXY_IP          proxy address the heartbeat goes to (proxy_ip); IP or DNS name
  MORIIO_PROXY_PING_PORT=36367  the proxy's discovery port (proxy_ping_port)
  MORIIO_GPUS              optional GPU list, e.g. 0,1,2,3: runs under HIP_VISIBLE_DEVICES
  MORIIO_KV_EXTRA_CONFIG   optional JSON object of more kv_connector_extra_config keys
                           (transfer_timeout, qp_per_transfer, ...)
  MORIIO_VLLM_EXTRA_ARGS   optional extra `vllm serve` arguments, split on whitespace
  MORIIO_VLLM=vllm         the vllm executable
  MORIIO_PYTHON=python3    Python used to build the JSON and quote the command

Arguments after -- are passed to `vllm serve` too. --port, --block-size, --kv-transfer-config
and the DP/TP sizes are this script's: set them with the variables above.
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

# uint NAME VALUE MIN MAX -> prints the value in canonical decimal form, or dies.
uint() {
  local name=$1 value=$2 min=$3 max=$4
  [[ $value =~ ^[0-9]{1,6}$ ]] || die "$name must be an integer, got '$value'"
  value=$((10#$value))
  ((value >= min && value <= max)) || die "$name must be between $min and $max, got $value"
  printf '%s' "$value"
}

# Ephemeral port range of Linux's default net.ipv4.ip_local_port_range (the port trap).
EPHEMERAL_LOW=32768
EPHEMERAL_HIGH=60999

# The name a caller knows a variable by (prefill.sh says PREFILL_PORT, not MORIIO_HTTP_PORT):
# MORIIO_ALIASES="MORIIO_HTTP_PORT=PREFILL_PORT MORIIO_MODEL=MODEL ...".
var_name() {
  local a
  for a in ${MORIIO_ALIASES:-}; do
    if [[ ${a%%=*} == "$1" ]]; then
      printf '%s' "${a#*=}"
      return
    fi
  done
  printf '%s' "$1"
}

is_local_to() { # is_local_to ADDRESS HOST_IP: ADDRESS is this host (same IP or loopback)
  [[ $1 == "$2" || $1 == localhost || $1 == 127.* || $1 == ::1 ]]
}

main() {
  local dry_run=0
  local -a extra=()
  while (($#)); do
    case $1 in
      --dry-run) dry_run=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        extra=("$@")
        break
        ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  if [[ -n ${MORIIO_VLLM_EXTRA_ARGS:-} ]]; then
    local -a from_env
    read -r -a from_env <<<"$MORIIO_VLLM_EXTRA_ARGS"
    extra=("${from_env[@]}" "${extra[@]}")
  fi

  local role=${MORIIO_ROLE:-}
  case ${role^^} in
    P | PREFILL | KV_PRODUCER) role=P ;;
    D | DECODE | KV_CONSUMER) role=D ;;
    "") die "$(var_name MORIIO_ROLE) is not set: P (prefill) or D (decode)" ;;
    *) die "$(var_name MORIIO_ROLE) must be P or D, got '$role'" ;;
  esac
  local model=${MORIIO_MODEL:-}
  [[ -n $model ]] || die "$(var_name MORIIO_MODEL) is not set: the model for \`vllm serve\`"
  local host_ip=${MORIIO_HOST_IP:-}
  [[ -n $host_ip ]] || die "$(var_name MORIIO_HOST_IP) is not set: the IP address peers and the proxy reach this instance at"

  local mode=${MORIIO_TRANSFER_MODE:-READ}
  mode=${mode^^}
  [[ $mode == READ || $mode == WRITE ]] || die "$(var_name MORIIO_TRANSFER_MODE) must be READ or WRITE, got '$mode'"
  local backend=${MORIIO_BACKEND:-rdma}
  backend=${backend,,}
  [[ $backend == rdma || $backend == xgmi ]] || die "$(var_name MORIIO_BACKEND) must be rdma or xgmi, got '$backend'"
  local discovery=${MORIIO_DISCOVERY:-zmq}
  discovery=${discovery,,}
  [[ $discovery == zmq || $discovery == kubernetes ]] ||
    die "$(var_name MORIIO_DISCOVERY) must be zmq or kubernetes, got '$discovery'"

  local dp tp block http hs nf n
  dp=$(uint "$(var_name MORIIO_DP_SIZE)" "${MORIIO_DP_SIZE:-1}" 1 1024)
  tp=$(uint "$(var_name MORIIO_TP_SIZE)" "${MORIIO_TP_SIZE:-1}" 1 1024)
  block=$(uint "$(var_name MORIIO_BLOCK_SIZE)" "${MORIIO_BLOCK_SIZE:-16}" 1 65536)
  ((dp == 1 || tp == 1)) ||
    die "dp_size $dp with tp_size $tp: vLLM 0.32 offsets MoRI-IO ports by dp_rank + tp_rank, so DP>1 with TP>1 collides; use DP>1 with TP=1, or TP>1 with DP=1"
  n=$((dp * tp))
  http=$(uint "$(var_name MORIIO_HTTP_PORT)" "${MORIIO_HTTP_PORT:-}" 1 65535)
  hs=$(uint "$(var_name MORIIO_HANDSHAKE_PORT)" "${MORIIO_HANDSHAKE_PORT:-}" 1 65535)
  nf=$(uint "$(var_name MORIIO_NOTIFY_PORT)" "${MORIIO_NOTIFY_PORT:-}" 1 65535)
  ((hs + n - 1 <= 65535)) || die "handshake ports $hs-$((hs + n - 1)) (dp_size*tp_size = $n) go past 65535"
  ((nf + n - 1 <= 65535)) || die "notify ports $nf-$((nf + n - 1)) (dp_size*tp_size = $n) go past 65535"
  if ((http >= hs && http <= hs + n - 1)); then
    die "http port $http lies in the handshake ports $hs-$((hs + n - 1))"
  fi
  if ((http >= nf && http <= nf + n - 1)); then
    die "http port $http lies in the notify ports $nf-$((nf + n - 1))"
  fi
  if ((hs <= nf + n - 1 && nf <= hs + n - 1)); then
    die "handshake ports $hs-$((hs + n - 1)) overlap notify ports $nf-$((nf + n - 1)) (each base uses dp_size*tp_size = $n ports)"
  fi

  local proxy_ip=${MORIIO_PROXY_IP:-} ping=""
  if [[ $discovery == zmq ]]; then
    [[ -n $proxy_ip ]] ||
      die "$(var_name MORIIO_PROXY_IP) is not set: without proxy_ip the instance never registers with the proxy"
    [[ $proxy_ip =~ ^[A-Za-z0-9._:-]+$ ]] || die "$(var_name MORIIO_PROXY_IP) is not an address: '$proxy_ip'"
    ping=$(uint "$(var_name MORIIO_PROXY_PING_PORT)" "${MORIIO_PROXY_PING_PORT:-36367}" 1 65535)
    if ((ping >= EPHEMERAL_LOW && ping <= EPHEMERAL_HIGH)) && is_local_to "$proxy_ip" "$host_ip"; then
      warn "port trap: the proxy's discovery port $ping is in Linux's ephemeral range $EPHEMERAL_LOW-$EPHEMERAL_HIGH on this host; start the proxy first or reserve the port: sysctl -w net.ipv4.ip_local_reserved_ports=$ping"
    fi
  else
    proxy_ip="" # the proxy watches the pods: no heartbeat
  fi

  local gpus=${MORIIO_GPUS:-}
  if [[ -n $gpus ]]; then
    [[ $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || die "$(var_name MORIIO_GPUS) must be a comma-separated list of GPU indexes, got '$gpus'"
    local -a gpu_list
    IFS=, read -r -a gpu_list <<<"$gpus"
    ((${#gpu_list[@]} >= n)) || die "$(var_name MORIIO_GPUS) lists ${#gpu_list[@]} GPU(s) ($gpus) but dp_size*tp_size = $n"
    [[ $(printf '%s\n' "${gpu_list[@]}" | sort -n | uniq -d) == "" ]] || die "$(var_name MORIIO_GPUS) lists a GPU twice: $gpus"
  fi

  # Flags this script owns must not come in through the extra arguments.
  local i arg value
  for ((i = 0; i < ${#extra[@]}; i++)); do
    arg=${extra[i]}
    case $arg in
      --port | --port=*)
        if [[ $arg == --port ]]; then value=${extra[i + 1]:-}; else value=${arg#--port=}; fi
        if [[ $value != "$http" ]]; then
          die "http_port ($http) must equal --port ($value): set it with $(var_name MORIIO_HTTP_PORT), not in the vLLM arguments"
        fi
        die "--port is set from $(var_name MORIIO_HTTP_PORT); remove it from the vLLM arguments"
        ;;
      --kv-transfer-config | --kv-transfer-config=* | --block-size | --block-size=* | \
        -tp | --tensor-parallel-size | --tensor-parallel-size=* | \
        -dp | --data-parallel-size | --data-parallel-size=*)
        die "${arg%%=*} is generated by this script from its own settings (see --help); remove it from the vLLM arguments"
        ;;
    esac
  done

  local line
  line=$(
    _PROG=$PROG _ROLE=$role _MODEL=$model _HOST_IP=$host_ip _PROXY_IP=$proxy_ip _PING=$ping \
      _HTTP=$http _HS=$hs _NF=$nf _DP=$dp _TP=$tp _BLOCK=$block _MODE=$mode _BACKEND=$backend \
      _GPUS=$gpus _KV_EXTRA=${MORIIO_KV_EXTRA_CONFIG:-} _VLLM=${MORIIO_VLLM:-vllm} \
      _N_KV_EXTRA="$(var_name MORIIO_KV_EXTRA_CONFIG)" _N_HOST_IP="$(var_name MORIIO_HOST_IP)" \
      "${MORIIO_PYTHON:-python3}" -c "$BUILD_PY" "${extra[@]}"
  ) || exit $?

  printf '%s\n' "$line"
  if ((dry_run)); then
    exit 0
  fi
  # The line is shlex-quoted by Python (POSIX quoting): what was printed is what runs.
  eval "exec $line"
}

# Builds the kv-transfer-config JSON and the whole command line, shell-quoted.
read -r -d '' BUILD_PY <<'PY' || true
import ipaddress, json, os, shlex, sys

e = os.environ


def die(msg):
    print(e["_PROG"] + ": error: " + msg, file=sys.stderr)
    sys.exit(2)


host = e["_HOST_IP"]
try:
    ipaddress.ip_address(host)
except ValueError:
    die(f"{e['_N_HOST_IP']} must be an IP address, got {host!r}")
cfg = {}
if e["_PROXY_IP"]:
    cfg["proxy_ip"] = e["_PROXY_IP"]
    cfg["proxy_ping_port"] = e["_PING"]
cfg["http_port"] = e["_HTTP"]
cfg["handshake_port"] = e["_HS"]
cfg["notify_port"] = e["_NF"]
if e["_MODE"] == "READ":
    cfg["read_mode"] = "true"
cfg["backend"] = e["_BACKEND"]
cfg["host_ip"] = host
owned = set(cfg) | {"proxy_ip", "proxy_ping_port", "read_mode"}
raw = e["_KV_EXTRA"].strip()
name = e["_N_KV_EXTRA"]
if raw:
    try:
        more = json.loads(raw)
    except json.JSONDecodeError as exc:
        die(f"{name} is not valid JSON: {exc}")
    if not isinstance(more, dict):
        die(f"{name} must be a JSON object")
    for key, value in more.items():
        if key == "http_port" and str(value) != cfg["http_port"]:
            die(f"http_port ({value}) in {name} must equal --port ({e['_HTTP']})")
        if key in owned:
            die(f"{key} in {name} is set by this script from its own settings (see --help)")
    cfg.update(more)
kv = {
    "kv_connector": "MoRIIOConnector",
    "kv_role": "kv_producer" if e["_ROLE"] == "P" else "kv_consumer",
    "kv_connector_extra_config": cfg,
}
argv = ["env", "HIP_VISIBLE_DEVICES=" + e["_GPUS"]] if e["_GPUS"] else []
argv += [e["_VLLM"], "serve", e["_MODEL"], "--port", e["_HTTP"], "--block-size", e["_BLOCK"],
         "--tensor-parallel-size", e["_TP"], "--data-parallel-size", e["_DP"],
         "--kv-transfer-config", json.dumps(kv, separators=(",", ":"))]
argv += sys.argv[1:]
print(shlex.join(argv))
PY

main "$@"
