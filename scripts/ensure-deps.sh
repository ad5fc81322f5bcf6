#!/usr/bin/env bash
# Installs the system packages ferry's demo and tests need, when they are missing:
# mosquitto (broker), mosquitto-clients (mosquitto_pub, for the demo), nginx-light (the reverse
# proxy in front of ferry-cloud in tests/faults_net.rs), openssl (the CLI that makes the test CA and
# certificates of tests/downlink.rs at run time) and fuse3 (fusermount3, for the crash-test
# filesystem of `make torture`), postgresql with psql (the center's store, in tests) and chromium
# (the console's browser tests), faketime (libfaketime: the agent's clock tests), and pysparkplug
# from PyPI in target/pyvenv (the Sparkplug B edge node of tests/sparkplug.rs).
# Usage: scripts/ensure-deps.sh [--msrv] [--bench]
#   --msrv   also installs Debian's Rust 1.85 (rustc-web)
#   --bench  also installs what `make bench` needs: libsqlite3-dev and pkg-config (the SQLite
#            baseline links Debian's libsqlite3, never a bundled build)
set -u

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
# PostgreSQL: the center's store in tests/cloud.rs and tests/center.rs (each test starts its own
# server in a temp dir; as root it runs as the package's `postgres` user).
has_postgres() { ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; }
has_postgres || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
# Chromium: the browser tests of the operators' console (tests/web_console.rs), headless.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# libfaketime: tests/clock.rs starts the agent with a faked wall clock (LD_PRELOAD).
has_faketime() { ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; }
has_faketime || need+=(faketime)

msrv=0; bench=0
for arg in "$@"; do
    case "$arg" in
        --msrv) msrv=1 ;;
        --bench) bench=1 ;;
        *) echo "ensure-deps: unknown argument $arg" >&2; exit 2 ;;
    esac
done
has_sqlite_dev() { pkg-config --exists sqlite3 2>/dev/null; }
if [ $bench -eq 1 ]; then
    command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
    has_sqlite_dev || need+=(libsqlite3-dev)
fi

MSRV_VERSION="1.85.0+dfsg3-1~deb12u3"
if [ $msrv -eq 1 ] && ! /usr/bin/rustc --version 2>/dev/null | grep -q "^rustc 1.85"; then
    need+=("rustc-web=$MSRV_VERSION" "cargo-web=$MSRV_VERSION" "libstd-rust-web-dev=$MSRV_VERSION")
fi

# pysparkplug (PyPI): the Sparkplug B edge node of tests/sparkplug.rs, in a venv under target/.
PYSPARKPLUG="pysparkplug==0.6.1"
VENV="$(dirname "$0")/../target/pyvenv"
has_pysparkplug() { "$VENV/bin/python3" -c "import pysparkplug" >/dev/null 2>&1; }
if ! has_pysparkplug; then
    command -v python3 >/dev/null 2>&1 || need+=(python3)
    python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
fi

install_pysparkplug() {
    has_pysparkplug && return 0
    echo "ensure-deps: installing $PYSPARKPLUG into target/pyvenv"
    python3 -m venv "$VENV" >/dev/null 2>&1 && "$VENV/bin/pip" install -q "$PYSPARKPLUG" >/dev/null 2>&1
    has_pysparkplug || { echo "ensure-deps: $PYSPARKPLUG is still missing (target/pyvenv)" >&2; return 1; }
}

if [ ${#need[@]} -eq 0 ]; then
    install_pysparkplug || exit 1
    exit 0
fi

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
command -v fusermount3 >/dev/null 2>&1 || { echo "ensure-deps: fusermount3 (fuse3) is still missing" >&2; missing=1; }
has_postgres || { echo "ensure-deps: postgresql is still missing" >&2; missing=1; }
command -v psql >/dev/null 2>&1 || { echo "ensure-deps: psql (postgresql-client) is still missing" >&2; missing=1; }
command -v chromium >/dev/null 2>&1 || { echo "ensure-deps: chromium is still missing" >&2; missing=1; }
has_faketime || { echo "ensure-deps: libfaketime (faketime) is still missing" >&2; missing=1; }
if [ $bench -eq 1 ] && ! has_sqlite_dev; then
    echo "ensure-deps: libsqlite3-dev (with pkg-config) is still missing" >&2; missing=1
fi
if [ $msrv -eq 1 ] && ! /usr/bin/rustc --version 2>/dev/null | grep -q "^rustc 1.85"; then
    echo "ensure-deps: Debian's rustc 1.85 (rustc-web $MSRV_VERSION) is still missing" >&2; missing=1
fi
install_pysparkplug || missing=1
# The mosquitto and nginx packages start system services (1883, 80); ferry's tests and demo start
# their own on free ports.
exit $missing
