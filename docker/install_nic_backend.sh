#!/usr/bin/env bash
# Installs the NIC user-space libraries that MoRI dlopens at run time, chosen by NIC_BACKEND.
# docker/Dockerfile.rocm runs it in its mori_base stage; it runs the same way anywhere else.
#
# Usage: install_nic_backend.sh [--dry-run | --print-versions | --help]
#
# Settings come from the environment (in the Dockerfile: its build ARGs of the same names):
#   NIC_BACKEND      none | ainic | bnxt | all (default none)
#                    none   nothing: mlx5 works with the base image's rdma-core
#                    ainic  AMD AINIC (Pensando): libionic-dev, ionic-common
#                    bnxt   Broadcom Thor/Thor2: bnxt-rocelib=BNXT_VERSION
#                    all    both of the above
#   AINIC_VERSION    the AINIC bundle, a folder of repo.radeon.com/amdainic/pensando/ubuntu/;
#                    needed by ainic and all; match the host's ionic driver and firmware
#   BNXT_VERSION     the bnxt-rocelib package version; needed by bnxt and all; match the
#                    host's bnxt_re driver (modinfo -F version bnxt_re)
#   UBUNTU_CODENAME  the suite of both vendor repositories (default jammy)
#   NIC_ROOT         a directory that prefixes every path written (for tests; default none)
#
# --dry-run changes nothing and prints every action, one a line, in this format:
#   backend NAME                     always first
#   key URL FILE                     fetch an ASCII-armored apt signing key into FILE
#   source FILE LINE                 write the one-line apt source LINE into FILE
#   apt-get ARGS...                  run apt-get (one update for the whole run)
#   rm -rf DIR/*                     empty apt's package lists
#   copy GLOB DIR                    copy the matching libraries into DIR (at least one)
#   ldconfig                         refresh the dynamic linker cache
# Without --dry-run every action is printed the same way, then carried out.
# --print-versions prints the versions.txt lines for this backend and changes nothing.
#
# Exit status: 0 done; 2 bad usage (an unknown NIC_BACKEND, a missing or malformed
# version); 1 anything else (no curl, a key that is not a key, apt-get failing).
set -euo pipefail

readonly BACKENDS="none, ainic, bnxt, all"

readonly AINIC_KEY_URL="https://repo.radeon.com/rocm/rocm.gpg.key"
readonly AINIC_REPO_URL="https://repo.radeon.com/amdainic/pensando/ubuntu"
readonly AINIC_PACKAGES=(libionic-dev ionic-common)

readonly BNXT_KEY_URL="https://packages.broadcom.com/artifactory/api/security/keypair/PackagesKey/public"
readonly BNXT_REPO_URL="https://packages.broadcom.com/artifactory/ethernet-nic-debian-public"
readonly BNXT_PACKAGE="bnxt-rocelib"
# bnxt-rocelib installs libbnxt_re under the multiarch directory; MoRI looks for it in
# /usr/local/lib itself.
readonly BNXT_LIB_DIR="/usr/local/lib/x86_64-linux-gnu"
readonly BNXT_LIB_GLOB="libbnxt_re*"

mode=install
nic_root="${NIC_ROOT:-}"
nic_root="${nic_root%/}"

die() { # status message
  echo "ERROR: $2" >&2
  exit "$1"
}

usage() {
  sed -n '2,/^set -euo pipefail$/{/^#/s/^# \{0,1\}//p}' "$0"
}

parse_args() {
  if [ "$#" -gt 1 ]; then
    die 2 "one option at most; see --help"
  fi
  case "${1:-}" in
    "") ;;
    --dry-run) mode=dry-run ;;
    --print-versions) mode=versions ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die 2 "unknown option '$1'; use --dry-run, --print-versions or --help" ;;
  esac
}

# ------------------------------------------------------------------ settings

backend="${NIC_BACKEND-none}"
codename="${UBUNTU_CODENAME:-jammy}"
want_ainic=false
want_bnxt=false

check_backend() {
  case "$backend" in
    none) ;;
    ainic) want_ainic=true ;;
    bnxt) want_bnxt=true ;;
    all)
      want_ainic=true
      want_bnxt=true
      ;;
    *) die 2 "unknown NIC_BACKEND=${backend}. Use one of: ${BACKENDS}" ;;
  esac
}

require_version() { # variable hint
  local name="$1" value="${!1:-}"
  if [ -z "$value" ]; then
    die 2 "NIC_BACKEND=${backend} needs ${name}: $2"
  fi
  if ! [[ "$value" =~ ^[A-Za-z0-9][A-Za-z0-9.+:~_-]*$ ]]; then
    die 2 "${name}='${value}' is not a version (letters, digits and . + : ~ _ - only)"
  fi
}

check_settings() {
  check_backend
  if "$want_ainic"; then
    require_version AINIC_VERSION \
      "the AINIC bundle matching the host driver, e.g. --build-arg AINIC_VERSION=1.117.3-hydra"
  fi
  if "$want_bnxt"; then
    require_version BNXT_VERSION \
      "the bnxt-rocelib version matching the host bnxt_re driver, e.g. --build-arg BNXT_VERSION=235.2.86.0"
  fi
  if ! [[ "$codename" =~ ^[a-z][a-z0-9-]*$ ]]; then
    die 2 "UBUNTU_CODENAME='${codename}' is not an Ubuntu codename such as jammy or noble"
  fi
}

print_versions() {
  local ainic="" bnxt=""
  if "$want_ainic"; then ainic="$AINIC_VERSION"; fi
  if "$want_bnxt"; then bnxt="$BNXT_VERSION"; fi
  echo "MORI_NIC_BACKEND=${backend}"
  echo "AINIC_VERSION=${ainic}"
  echo "BNXT_VERSION=${bnxt}"
}

# ------------------------------------------------------------------ actions
# Each prints its line, then (unless --dry-run) does it.

say() {
  echo "$*"
}

do_key() { # url file
  say key "$1" "$2"
  [ "$mode" = dry-run ] && return 0
  mkdir -p "$(dirname "$2")"
  if ! curl -fsSL --retry 3 --retry-delay 2 -o "$2" "$1"; then
    die 1 "could not fetch the signing key $1"
  fi
  if ! grep -q -e '-----BEGIN PGP PUBLIC KEY BLOCK-----' "$2"; then
    die 1 "$1 did not return an ASCII-armored OpenPGP key"
  fi
  chmod 0644 "$2"
}

do_source() { # file line
  say source "$1" "$2"
  [ "$mode" = dry-run ] && return 0
  mkdir -p "$(dirname "$1")"
  printf '%s\n' "$2" >"$1"
}

do_apt() { # args...
  say apt-get "$@"
  [ "$mode" = dry-run ] && return 0
  apt-get "$@"
}

do_clean_lists() { # dir
  say rm -rf "$1/*"
  [ "$mode" = dry-run ] && return 0
  rm -rf "${1:?}"/*
}

do_copy() { # dir glob dest
  say copy "$1/$2" "$3/"
  [ "$mode" = dry-run ] && return 0
  local files
  shopt -s nullglob
  # shellcheck disable=SC2206  # the glob is meant to expand here
  files=("$1"/$2)
  shopt -u nullglob
  if [ "${#files[@]}" -eq 0 ]; then
    die 1 "${BNXT_PACKAGE} installed no $2 under $1"
  fi
  mkdir -p "$3"
  cp -a "${files[@]}" "$3/"
}

do_ldconfig() {
  say ldconfig
  [ "$mode" = dry-run ] && return 0
  ldconfig
}

# ------------------------------------------------------------------ checks before acting

preflight() {
  command -v curl >/dev/null 2>&1 ||
    die 1 "curl is needed to fetch the vendor signing keys; install it in the base image"
  command -v apt-get >/dev/null 2>&1 ||
    die 1 "apt-get not found: NIC_BACKEND=${backend} needs a Debian/Ubuntu base image"
  local arch
  arch="$(dpkg --print-architecture)"
  if [ "$arch" != amd64 ]; then
    die 1 "NIC_BACKEND=${backend} needs an amd64 image (the vendor repositories are set up for amd64); this one is ${arch}"
  fi
  local os_release="${nic_root}/etc/os-release" image_codename=""
  if [ -r "$os_release" ]; then
    image_codename="$(sed -n 's/^VERSION_CODENAME=//p' "$os_release" | tr -d '"')"
  fi
  if [ -n "$image_codename" ] && [ "$image_codename" != "$codename" ]; then
    echo "WARNING: UBUNTU_CODENAME=${codename} but the image is ${image_codename}:" \
      "the vendor packages are for ${codename}" >&2
  fi
}

# ------------------------------------------------------------------ the install

install() {
  local keyrings="${nic_root}/etc/apt/keyrings"
  local sources="${nic_root}/etc/apt/sources.list.d"
  local packages=()

  say backend "$backend"
  if [ "$backend" = none ]; then
    return 0
  fi
  if [ "$mode" = install ]; then
    preflight
  fi
  export DEBIAN_FRONTEND=noninteractive

  # The keys are ASCII-armored: apt (>= 1.4) reads them as they are from a .asc file, so
  # neither gnupg nor an apt-get update before this one is needed.
  if "$want_ainic"; then
    do_key "$AINIC_KEY_URL" "${keyrings}/amdainic.asc"
    do_source "${sources}/amdainic.list" \
      "deb [arch=amd64 signed-by=/etc/apt/keyrings/amdainic.asc] ${AINIC_REPO_URL}/${AINIC_VERSION} ${codename} main"
    packages+=("${AINIC_PACKAGES[@]}")
  fi
  if "$want_bnxt"; then
    do_key "$BNXT_KEY_URL" "${keyrings}/broadcom-nic.asc"
    do_source "${sources}/broadcom-nic.list" \
      "deb [arch=amd64 signed-by=/etc/apt/keyrings/broadcom-nic.asc] ${BNXT_REPO_URL} ${codename} main"
    packages+=("${BNXT_PACKAGE}=${BNXT_VERSION}")
  fi

  if ! do_apt update; then
    die 1 "apt-get update failed: check that AINIC_VERSION/UBUNTU_CODENAME name a published repository"
  fi
  if ! do_apt install -y --no-install-recommends "${packages[@]}"; then
    die 1 "apt-get install failed: check the versions (inside the image: apt-cache madison ${packages[*]%%=*})"
  fi
  do_apt clean
  do_clean_lists "${nic_root}/var/lib/apt/lists"

  if "$want_bnxt"; then
    do_copy "${nic_root}${BNXT_LIB_DIR}" "$BNXT_LIB_GLOB" "${nic_root}/usr/local/lib"
  fi
  do_ldconfig
}

main() {
  parse_args "$@"
  check_settings
  if [ "$mode" = versions ]; then
    print_versions
  else
    install
  fi
}

main "$@"
