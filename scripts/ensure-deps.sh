#!/usr/bin/env bash
# Installs the system packages ferry's demo and tests need, when they are missing:
# mosquitto (broker), mosquitto-clients (mosquitto_pub, for the demo), nginx-light (the reverse
# proxy in front of ferry-cloud in tests/faults_net.rs) and openssl (the CLI that makes the test CA
# and certificates of tests/downlink.rs at run time).
# Usage: scripts/ensure-deps.sh [--msrv]   (--msrv also installs Debian's Rust 1.85, rustc-web)
set -u

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v openssl >/dev/null 2>&1 || need+=(openssl)

MSRV_VERSION="1.85.0+dfsg3-1~deb12u3"
if [ "${1:-}" = "--msrv" ] && ! /usr/bin/rustc --version 2>/dev/null | grep -q "^rustc 1.85"; then
    need+=("rustc-web=$MSRV_VERSION" "cargo-web=$MSRV_VERSION" "libstd-rust-web-dev=$MSRV_VERSION")
fi

[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "ensure-deps: installing ${need[*]} with apt-get (missing on this machine)"
# A mirror mid-sync can make 'apt-get update' fail for one index; carry on and check what matters.
$SUDO apt-get update -qq >/dev/null 2>&1 || echo "ensure-deps: apt-get update reported errors; trying anyway"
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
    || echo "ensure-deps: apt-get install reported errors; checking what installed"

missing=0
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "ensure-deps: mosquitto is still missing" >&2; missing=1
fi
command -v mosquitto_pub >/dev/null 2>&1 || { echo "ensure-deps: mosquitto_pub is still missing" >&2; missing=1; }
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    echo "ensure-deps: nginx is still missing" >&2; missing=1
fi
command -v openssl >/dev/null 2>&1 || { echo "ensure-deps: openssl is still missing" >&2; missing=1; }
if [ "${1:-}" = "--msrv" ] && ! /usr/bin/rustc --version 2>/dev/null | grep -q "^rustc 1.85"; then
    echo "ensure-deps: Debian's rustc 1.85 (rustc-web $MSRV_VERSION) is still missing" >&2; missing=1
fi
# The mosquitto and nginx packages start system services (1883, 80); ferry's tests and demo start
# their own on free ports.
exit $missing
