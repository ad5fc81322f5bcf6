#!/usr/bin/env bash
# Release builds of `ferry` for ARM gateways: one static binary per target, sizes printed and held
# to the budget (stripped, <= 6 MiB).
#
# Route: `cross` (Docker images, Cross.toml) when `cross` is on PATH and a Docker engine answers
# `docker info`; otherwise the Debian route, which needs no Docker: Debian's cargo/rustc-web 1.85
# with the multiarch std and the gcc cross linkers (scripts/ensure-cross.sh installs them). The
# linkers, +crt-static and ring's C compilers come from .cargo/config.toml on either route.
#
# Usage: scripts/cross.sh [TARGET...]   (default: aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
# Output: target/<triple>/release/ferry (cross) or target/arm/<triple>/release/ferry (Debian route).
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET=$((6 * 1024 * 1024))
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
MSRV_CARGO="${MSRV_CARGO:-/usr/bin/cargo}"

if command -v cross >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; then
    route=cross
else
    route=debian
    command -v cross >/dev/null 2>&1 && echo "cross: found cross but no Docker engine answers; using the Debian route" >&2
    scripts/ensure-cross.sh || { echo "cross: the Debian cross toolchain is incomplete (see above)" >&2; exit 1; }
fi

over=0
for t in "${targets[@]}"; do
    case "$t" in
        aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf) ;;
        *) echo "cross: unsupported target $t" >&2; exit 2 ;;
    esac
    if [ "$route" = cross ]; then
        echo "cross: building $t with cross (Docker)" >&2
        cross build --locked --release --bin ferry --target "$t"
        bin="target/$t/release/ferry"
    else
        echo "cross: building $t with Debian's $("$MSRV_CARGO" --version) (no Docker)" >&2
        PATH=/usr/bin:$PATH CARGO_TARGET_DIR=target/arm "$MSRV_CARGO" build --locked --release --bin ferry --target "$t"
        bin="target/arm/$t/release/ferry"
    fi
    size=$(stat -c %s "$bin")
    verdict="ok"
    [ "$size" -gt "$BUDGET" ] && { verdict="OVER BUDGET"; over=1; }
    awk -v t="$t" -v s="$size" -v v="$verdict" -v b="$bin" \
        'BEGIN { printf "%-32s %9d bytes (%.2f MiB of a 6 MiB budget) %s  %s\n", t, s, s / 1048576, v, b }'
    # A static executable has no program interpreter (PT_INTERP).
    if LC_ALL=C readelf -l "$bin" 2>/dev/null | grep -q "INTERP"; then
        echo "cross: $bin is dynamically linked" >&2
        over=1
    fi
done
exit $over
