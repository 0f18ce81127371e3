# shellcheck shell=bash
# Shared by prefill.sh, decode.sh and proxy.sh: settings from flags > environment >
# --env-file > defaults, the deployment-wide checks (ports and GPUs shared by P, D and the
# proxy on one host, xgmi across hosts), then one command printed and run.
#
# One env file describes the whole deployment (deploy/scripts/examples/*.env); copy it to
# every node and run each script there with the same file.

MORIIO_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

EPHEMERAL_LOW=32768
EPHEMERAL_HIGH=60999

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

# uint NAME VALUE MIN MAX -> the value in canonical decimal form, or dies.
uint() {
  local name=$1 value=$2 min=$3 max=$4
  [[ $value =~ ^[0-9]{1,6}$ ]] || die "$name must be an integer, got '$value'"
  value=$((10#$value))
  ((value >= min && value <= max)) || die "$name must be between $min and $max, got $value"
  printf '%s' "$value"
}

# load_env_file FILE: KEY=VALUE lines ('#' comments, optional 'export ', optional quotes).
# A variable already set (by the environment, or by a flag, parsed first) keeps its value.
load_env_file() {
  local file=$1 line key value n=0
  [[ -r $file ]] || die "cannot read env file '$file'"
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    line=${line#"${line%%[![:space:]]*}"}
    [[ -z $line || $line == \#* ]] && continue
    line=${line#export }
    [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || die "$file:$n: expected KEY=VALUE, got '$line'"
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    value=${value%"${value##*[![:space:]]}"}
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
      value=${BASH_REMATCH[1]}
    fi
    if [[ -z ${!key+x} ]]; then
      printf -v "$key" '%s' "$value"
    fi
  done <"$file"
}

set_flag() { # set_flag VAR VALUE: a flag's value, which wins over everything else
  printf -v "$1" '%s' "$2"
}

# flag_value "$@": the value of '--flag VALUE' or '--flag=VALUE'; sets SHIFT to 1 or 2.
flag_value() {
  if [[ $1 == *=* ]]; then
    FLAG_VALUE=${1#*=}
    SHIFT=1
  else
    (($# >= 2)) || die "$1 needs a value"
    FLAG_VALUE=$2
    SHIFT=2
  fi
}

same_host() { # same_host A B: both name this host (equal, or one is loopback)
  local a=$1 b=$2
  [[ -n $a && -n $b ]] || return 1
  [[ $a == "$b" ]] && return 0
  [[ $a == localhost || $a == 127.* || $a == ::1 || $b == localhost || $b == 127.* || $b == ::1 ]]
}

# The ports one host must give: "LABEL START COUNT" lines, checked pairwise.
declare -a HOST_PORTS=()
add_ports() { HOST_PORTS+=("$1 $2 $3"); }
check_port_overlaps() { # check_port_overlaps HOST
  local i j a b la sa ca lb sb cb
  for ((i = 0; i < ${#HOST_PORTS[@]}; i++)); do
    for ((j = i + 1; j < ${#HOST_PORTS[@]}; j++)); do
      read -r la sa ca <<<"${HOST_PORTS[i]}"
      read -r lb sb cb <<<"${HOST_PORTS[j]}"
      if ((sa <= sb + cb - 1 && sb <= sa + ca - 1)); then
        a="$la $(port_range "$sa" "$ca")"
        b="$lb $(port_range "$sb" "$cb")"
        die "port overlap on host $1: $a and $b (each MoRI-IO base uses dp_size*tp_size ports)"
      fi
    done
  done
}
port_range() { if (($2 == 1)); then printf '%s' "$1"; else printf '%s-%s' "$1" "$(($1 + $2 - 1))"; fi; }

# role_settings ROLE(PREFILL|DECODE): reads and checks that role's variables into R_* names.
role_settings() {
  local r=$1 v
  v=${r}_HOST_IP
  R_HOST=${!v:-${HOST_IP:-}}
  v=${r}_PORT
  R_PORT=$(uint "$v" "${!v:-$(role_default "$r" PORT)}" 1 65535)
  v=${r}_HANDSHAKE_PORT
  R_HS=$(uint "$v" "${!v:-$(role_default "$r" HANDSHAKE_PORT)}" 1 65535)
  v=${r}_NOTIFY_PORT
  R_NF=$(uint "$v" "${!v:-$(role_default "$r" NOTIFY_PORT)}" 1 65535)
  v=${r}_DP
  R_DP=$(uint "$v" "${!v:-1}" 1 1024)
  v=${r}_TP
  R_TP=$(uint "$v" "${!v:-1}" 1 1024)
  R_N=$((R_DP * R_TP))
  v=${r}_GPUS
  R_GPUS=${!v:-}
  [[ -z $R_GPUS || $R_GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] ||
    die "$v must be a comma-separated list of GPU indexes, got '$R_GPUS'"
}
role_default() {
  case $1_$2 in
    PREFILL_PORT) echo 20005 ;;
    PREFILL_HANDSHAKE_PORT) echo 6301 ;;
    PREFILL_NOTIFY_PORT) echo 6105 ;;
    DECODE_PORT) echo 40005 ;;
    DECODE_HANDSHAKE_PORT) echo 7301 ;;
    DECODE_NOTIFY_PORT) echo 7501 ;;
  esac
}
role_ports() { # role_ports LABEL: the current R_* ports into HOST_PORTS
  add_ports "$1-http" "$R_PORT" 1
  add_ports "$1-handshake" "$R_HS" "$R_N"
  add_ports "$1-notify" "$R_NF" "$R_N"
}

gpu_count() { local -a g; IFS=, read -r -a g <<<"$1"; printf '%s' "${#g[@]}"; }
seq_list() { # seq_list FIRST COUNT -> FIRST,FIRST+1,...
  local i out=""
  for ((i = $1; i < $1 + $2; i++)); do out+=${out:+,}$i; done
  printf '%s' "$out"
}

instance_usage() {
  local role=$1 lower=${1,,}
  cat <<EOF
Usage: ${lower}.sh [--env-file FILE] [--dry-run] [OPTIONS] [-- EXTRA_VLLM_ARGS...]

Starts the MoRI-IO ${lower} instance (kv_$([[ $role == PREFILL ]] && echo producer || echo consumer)) of a P/D deployment with
\`vllm serve\`: checks the deployment, prints the command as one shell-quoted line on stdout,
then runs it. --dry-run prints only. Errors: one line on stderr, exit status 2.

Settings come from flags, then the environment, then --env-file (or \$MORIIO_ENV_FILE), then
the defaults below. Use one env file for the whole deployment (examples/*.env) so every
script sees both roles: P and D on one host must not share ports or GPUs.

Options (and the variable each sets):
  --model M              MODEL (required)
  --mode READ|WRITE      TRANSFER_MODE=READ     the same on P and D
  --backend rdma|xgmi    BACKEND=rdma           xgmi only with P and D on one host
  --proxy-ip ADDR        PROXY_IP (required)    where heartbeats go (proxy_ip)
  --proxy-ping-port N    PROXY_PING_PORT=36367  the proxy's discovery port
  --block-size N         BLOCK_SIZE=16          the same on P and D
  --host-ip IP           ${role}_HOST_IP (default: HOST_IP)  this instance's address
  --port N               ${role}_PORT=$(role_default "$role" PORT)  vLLM --port and http_port
  --handshake-port N     ${role}_HANDSHAKE_PORT=$(role_default "$role" HANDSHAKE_PORT)
  --notify-port N        ${role}_NOTIFY_PORT=$(role_default "$role" NOTIFY_PORT)
  --dp N                 ${role}_DP=1           data-parallel size
  --tp N                 ${role}_TP=1           tensor-parallel size (not with DP>1)
  --gpus LIST            ${role}_GPUS           GPU indexes, e.g. 0,1,2,3 (HIP_VISIBLE_DEVICES)
  --vllm PATH            VLLM=vllm
Other variables: KV_EXTRA_CONFIG (a JSON object of more kv_connector_extra_config keys),
PROXY_PORT=10001 (checked against this host's ports when PROXY_IP is this host), and the
other role's PREFILL_* / DECODE_* variables (checked when both roles share a host).

With P and D on one host and neither GPU list set, P gets the first dp*tp GPUs and D the
next ones. Each MoRI-IO base port takes dp_size*tp_size consecutive ports.
EOF
}

# run_instance ROLE(PREFILL|DECODE) "$@"
run_instance() {
  local role=$1
  shift
  local dry_run=0
  local -a extra=()
  local env_file=${MORIIO_ENV_FILE:-}
  while (($#)); do
    case $1 in
      --dry-run)
        dry_run=1
        shift
        continue
        ;;
      -h | --help)
        instance_usage "$role"
        exit 0
        ;;
      --)
        shift
        extra=("$@")
        break
        ;;
    esac
    local var
    case ${1%%=*} in
      --env-file) var=ENV_FILE ;;
      --model) var=MODEL ;;
      --mode) var=TRANSFER_MODE ;;
      --backend) var=BACKEND ;;
      --proxy-ip) var=PROXY_IP ;;
      --proxy-ping-port) var=PROXY_PING_PORT ;;
      --block-size) var=BLOCK_SIZE ;;
      --host-ip) var=${role}_HOST_IP ;;
      --port) var=${role}_PORT ;;
      --handshake-port) var=${role}_HANDSHAKE_PORT ;;
      --notify-port) var=${role}_NOTIFY_PORT ;;
      --dp) var=${role}_DP ;;
      --tp) var=${role}_TP ;;
      --gpus) var=${role}_GPUS ;;
      --vllm) var=VLLM ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    flag_value "$@"
    if [[ $var == ENV_FILE ]]; then env_file=$FLAG_VALUE; else set_flag "$var" "$FLAG_VALUE"; fi
    shift "$SHIFT"
  done
  [[ -z $env_file ]] || load_env_file "$env_file"

  local peer=DECODE
  [[ $role == PREFILL ]] || peer=PREFILL
  local backend=${BACKEND:-rdma}

  role_settings "$peer"
  local peer_host=$R_HOST peer_n=$R_N peer_gpus=$R_GPUS
  local -a peer_ports=("$R_PORT" "$R_HS" "$R_NF")
  role_settings "$role"
  [[ -n $R_HOST ]] ||
    die "${role}_HOST_IP (or HOST_IP) is not set: the IP address peers and the proxy reach this instance at"

  local gpus=$R_GPUS
  if same_host "$R_HOST" "$peer_host"; then
    role_ports "${role,,}"
    add_ports "${peer,,}-http" "${peer_ports[0]}" 1
    add_ports "${peer,,}-handshake" "${peer_ports[1]}" "$peer_n"
    add_ports "${peer,,}-notify" "${peer_ports[2]}" "$peer_n"
    if [[ -z $gpus && -z $peer_gpus ]]; then
      # Default split of one node: P first, then D.
      if [[ $role == PREFILL ]]; then gpus=$(seq_list 0 "$R_N"); else gpus=$(seq_list "$peer_n" "$R_N"); fi
    elif [[ -z $gpus || -z $peer_gpus ]]; then
      die "P and D share host $R_HOST: set both PREFILL_GPUS and DECODE_GPUS (disjoint), or neither for the default split"
    else
      local g
      for g in ${gpus//,/ }; do
        [[ ,$peer_gpus, != *,$g,* ]] ||
          die "P and D share host $R_HOST and both list GPU $g (PREFILL_GPUS=${PREFILL_GPUS:-}, DECODE_GPUS=${DECODE_GPUS:-})"
      done
    fi
  else
    role_ports "${role,,}"
    if [[ ${backend,,} == xgmi && -n $peer_host ]]; then
      die "backend xgmi moves KV between the GPUs of one node, but ${role,,} ($R_HOST) and ${peer,,} ($peer_host) are on different hosts: use BACKEND=rdma"
    fi
  fi
  if same_host "$R_HOST" "${PROXY_IP:-}"; then
    local proxy_port proxy_ping
    proxy_port=$(uint PROXY_PORT "${PROXY_PORT:-10001}" 1 65535)
    proxy_ping=$(uint PROXY_PING_PORT "${PROXY_PING_PORT:-36367}" 1 65535)
    add_ports proxy-http "$proxy_port" 1
    add_ports proxy-discovery "$proxy_ping" 1
  fi
  check_port_overlaps "$R_HOST"

  local -a args=()
  ((dry_run)) && args+=(--dry-run)
  MORIIO_PROG=$PROG \
    MORIIO_ROLE=${role:0:1} \
    MORIIO_MODEL=${MODEL:-} \
    MORIIO_HOST_IP=$R_HOST \
    MORIIO_HTTP_PORT=$R_PORT \
    MORIIO_HANDSHAKE_PORT=$R_HS \
    MORIIO_NOTIFY_PORT=$R_NF \
    MORIIO_DP_SIZE=$R_DP \
    MORIIO_TP_SIZE=$R_TP \
    MORIIO_TRANSFER_MODE=${TRANSFER_MODE:-READ} \
    MORIIO_BACKEND=$backend \
    MORIIO_BLOCK_SIZE=${BLOCK_SIZE:-16} \
    MORIIO_DISCOVERY=zmq \
    MORIIO_PROXY_IP=${PROXY_IP:-} \
    MORIIO_PROXY_PING_PORT=${PROXY_PING_PORT:-36367} \
    MORIIO_GPUS=$gpus \
    MORIIO_KV_EXTRA_CONFIG=${KV_EXTRA_CONFIG:-} \
    MORIIO_VLLM=${VLLM:-vllm} \
    MORIIO_VLLM_EXTRA_ARGS="" \
    MORIIO_ALIASES="MORIIO_MODEL=MODEL MORIIO_HOST_IP=${role}_HOST_IP MORIIO_HTTP_PORT=${role}_PORT \
MORIIO_HANDSHAKE_PORT=${role}_HANDSHAKE_PORT MORIIO_NOTIFY_PORT=${role}_NOTIFY_PORT \
MORIIO_DP_SIZE=${role}_DP MORIIO_TP_SIZE=${role}_TP MORIIO_GPUS=${role}_GPUS \
MORIIO_TRANSFER_MODE=TRANSFER_MODE MORIIO_BACKEND=BACKEND MORIIO_BLOCK_SIZE=BLOCK_SIZE \
MORIIO_PROXY_IP=PROXY_IP MORIIO_PROXY_PING_PORT=PROXY_PING_PORT \
MORIIO_KV_EXTRA_CONFIG=KV_EXTRA_CONFIG" \
    exec bash "$MORIIO_SCRIPTS_DIR/moriio-vllm.sh" "${args[@]}" -- "${extra[@]}"
}

proxy_usage() {
  cat <<'EOF'
Usage: proxy.sh [--env-file FILE] [--dry-run] [OPTIONS] [-- EXTRA_SERVE_ARGS...]

Starts `moriio-proxy serve` for a P/D deployment: checks its ports, prints the command as
one shell-quoted line on stdout, then runs it. --dry-run prints only. Errors: one line on
stderr, exit status 2. Start the proxy before the vLLM instances (the port trap).

Settings come from flags, then the environment, then --env-file (or $MORIIO_ENV_FILE), then
the defaults below; the same env file as prefill.sh and decode.sh.

Options (and the variable each sets):
  --host ADDR             PROXY_BIND_HOST=0.0.0.0       HTTP bind address
  --port N                PROXY_PORT=10001              HTTP port for OpenAI clients
  --discovery-host ADDR   PROXY_DISCOVERY_HOST=0.0.0.0  ZMQ bind address for heartbeats
  --discovery-port N      PROXY_PING_PORT=36367         the instances' proxy_ping_port
  --instance-ttl S        PROXY_INSTANCE_TTL=10         seconds of heartbeat silence before eviction
  --discovery-allow NETS  PROXY_DISCOVERY_ALLOW         source networks allowed to register
  --mode READ|WRITE|auto  TRANSFER_MODE=READ            pins the mode the instances use
  --log-level LEVEL       PROXY_LOG_LEVEL=info
  --proxy-bin PATH        PROXY_BIN=moriio-proxy
PROXY_IP (the address instances reach the proxy at) names this host for the port checks
against PREFILL_* / DECODE_* instances that run here too.
EOF
}

run_proxy() {
  local dry_run=0
  local -a extra=()
  local env_file=${MORIIO_ENV_FILE:-}
  while (($#)); do
    case $1 in
      --dry-run)
        dry_run=1
        shift
        continue
        ;;
      -h | --help)
        proxy_usage
        exit 0
        ;;
      --)
        shift
        extra=("$@")
        break
        ;;
    esac
    local var
    case ${1%%=*} in
      --env-file) var=ENV_FILE ;;
      --host) var=PROXY_BIND_HOST ;;
      --port) var=PROXY_PORT ;;
      --discovery-host) var=PROXY_DISCOVERY_HOST ;;
      --discovery-port) var=PROXY_PING_PORT ;;
      --instance-ttl) var=PROXY_INSTANCE_TTL ;;
      --discovery-allow) var=PROXY_DISCOVERY_ALLOW ;;
      --mode) var=TRANSFER_MODE ;;
      --log-level) var=PROXY_LOG_LEVEL ;;
      --proxy-bin) var=PROXY_BIN ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    flag_value "$@"
    if [[ $var == ENV_FILE ]]; then env_file=$FLAG_VALUE; else set_flag "$var" "$FLAG_VALUE"; fi
    shift "$SHIFT"
  done
  [[ -z $env_file ]] || load_env_file "$env_file"

  local port ping ttl mode
  port=$(uint PROXY_PORT "${PROXY_PORT:-10001}" 1 65535)
  ping=$(uint PROXY_PING_PORT "${PROXY_PING_PORT:-36367}" 1 65535)
  ttl=${PROXY_INSTANCE_TTL:-10}
  if [[ ! $ttl =~ ^[0-9]+([.][0-9]+)?$ || $ttl =~ ^0+([.]0*)?$ ]]; then
    die "PROXY_INSTANCE_TTL must be a positive number of seconds, got '$ttl'"
  fi
  mode=${TRANSFER_MODE:-READ}
  case ${mode^^} in
    READ | WRITE) mode=${mode^^} ;;
    AUTO) mode=auto ;;
    *) die "TRANSFER_MODE must be READ, WRITE or auto, got '$mode'" ;;
  esac

  add_ports proxy-http "$port" 1
  add_ports proxy-discovery "$ping" 1
  local host=${PROXY_IP:-} r
  if [[ -n $host ]]; then
    for r in PREFILL DECODE; do
      role_settings "$r"
      if same_host "$host" "$R_HOST"; then role_ports "${r,,}"; fi
    done
  fi
  check_port_overlaps "${host:-this host}"

  if ((ping >= EPHEMERAL_LOW && ping <= EPHEMERAL_HIGH)); then
    warn "port trap: discovery port $ping is in Linux's ephemeral range $EPHEMERAL_LOW-$EPHEMERAL_HIGH; start the proxy before the instances, or reserve the port on this host: sysctl -w net.ipv4.ip_local_reserved_ports=$ping"
  fi

  local -a argv=("${PROXY_BIN:-moriio-proxy}" serve
    --host "${PROXY_BIND_HOST:-0.0.0.0}" --port "$port"
    --discovery-host "${PROXY_DISCOVERY_HOST:-0.0.0.0}" --discovery-port "$ping"
    --instance-ttl "$ttl" --transfer-mode "$mode")
  [[ -z ${PROXY_DISCOVERY_ALLOW:-} ]] || argv+=(--discovery-allow "$PROXY_DISCOVERY_ALLOW")
  [[ -z ${PROXY_LOG_LEVEL:-} ]] || argv+=(--log-level "$PROXY_LOG_LEVEL")
  argv+=("${extra[@]}")

  local line
  line=$("${MORIIO_PYTHON:-python3}" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "${argv[@]}")
  printf '%s\n' "$line"
  ((dry_run)) && exit 0
  exec "${argv[@]}"
}
