#!/usr/bin/env bash
# Installs the Debian route to ARM builds when it is missing: no Docker, no rustup, only Debian 12
# packages.
#   - multiarch arm64/armhf:  libstd-rust-web-dev, the standard library for Debian's rustc-web, at
#     exactly the version of the host's rustc-web and cargo-web (a std must match its compiler)
#   - gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf (+ libc6-dev-*-cross): linkers and C compilers
#     for ring, with the static glibc (libc.a) that +crt-static links
#   - qemu-user-static: runs the ARM test binaries (make test-arm)
#
# Versions: libstd-rust-web-dev is Multi-Arch: same, so amd64, arm64 and armhf must carry the same
# version. A Debian mirror can be briefly out of sync between architectures (one architecture's
# index already lists the new upload, another's does not, or fails to download): the script takes
# the newest version of the series (default 1.85, the MSRV) that every architecture offers,
# preferring the one already installed, rather than failing on the newest.
#
# Usage: scripts/ensure-cross.sh            install what is missing
#        scripts/ensure-cross.sh --check    say what is missing, install nothing (exit 1 if any)
# Environment: FERRY_RUST_SERIES (default 1.85), the rustc-web series to use.
set -u

SERIES="${FERRY_RUST_SERIES:-1.85}"
ARCHES=(amd64 arm64 armhf)
CHECK_ONLY=0
[ "${1:-}" = "--check" ] && CHECK_ONLY=1

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

say() { echo "ensure-cross: $*" >&2; }

installed_version() { # package[:arch]
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null | awk '$1 == "ii" { print $2 }'
}

tools_missing() {
    local t
    for t in aarch64-linux-gnu-gcc arm-linux-gnueabihf-gcc qemu-aarch64-static qemu-arm-static; do
        command -v "$t" >/dev/null 2>&1 || { echo "$t"; }
    done
    [ -e /usr/aarch64-linux-gnu/lib/libc.a ] || echo "libc.a (arm64)"
    [ -e /usr/arm-linux-gnueabihf/lib/libc.a ] || echo "libc.a (armhf)"
}

# The rustc-web version every architecture's std matches, or nothing.
rust_complete() {
    local v a
    v="$(installed_version rustc-web)"
    [ -n "$v" ] || return 1
    [ "$(installed_version cargo-web)" = "$v" ] || return 1
    for a in "${ARCHES[@]}"; do
        [ "$(installed_version "libstd-rust-web-dev:$a")" = "$v" ] || return 1
    done
    echo "$v"
}

# Versions of a package offered for one architecture (one per line).
offered() { # package arch
    apt-cache madison "$1:$2" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }'
}

# The version to install: in the series, offered for every architecture (libstd-rust-web-dev) and
# for the host (rustc-web, cargo-web); the installed rustc-web's version if it qualifies, else the
# newest.
pick_version() {
    local common a v best="" installed
    common="$(offered libstd-rust-web-dev amd64 | grep "^$SERIES\." | sort -u)"
    for a in arm64 armhf; do
        common="$(comm -12 <(echo "$common") <(offered libstd-rust-web-dev "$a" | sort -u))"
    done
    common="$(comm -12 <(echo "$common") <(offered rustc-web amd64 | sort -u))"
    common="$(comm -12 <(echo "$common") <(offered cargo-web amd64 | sort -u))"
    [ -n "$common" ] || return 1
    installed="$(installed_version rustc-web)"
    if [ -n "$installed" ] && grep -qxF "$installed" <<<"$common"; then
        echo "$installed"
        return 0
    fi
    while read -r v; do
        [ -z "$v" ] && continue
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best="$v"; fi
    done <<<"$common"
    echo "$best"
}

# Multi-Arch: same libraries the foreign std pulls in (libc6, liblzma5, libllvm19...) must carry the
# same version on every architecture. When the host's installed version is not offered for an ARM
# architecture (the host was installed from a newer or an older index), pin all three to the newest
# version that every architecture offers. Prints `pkg:arch=version` arguments for apt-get.
align_multiarch() { # std-version
    local pkg inst a ok v best common
    for pkg in $(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "libstd-rust-web-dev:arm64=$1" "libstd-rust-web-dev:armhf=$1" 2>/dev/null \
        | grep -v '^ ' | sed 's/:.*//' | sort -u); do
        case "$pkg" in libstd-rust-web*) continue ;; esac
        inst="$(installed_version "$pkg:amd64")"
        [ -n "$inst" ] || continue
        ok=1
        for a in arm64 armhf; do offered "$pkg" "$a" | grep -qxF "$inst" || ok=0; done
        [ "$ok" -eq 1 ] && continue
        common="$(offered "$pkg" amd64 | sort -u)"
        for a in arm64 armhf; do common="$(comm -12 <(echo "$common") <(offered "$pkg" "$a" | sort -u))"; done
        best=""
        while read -r v; do
            [ -z "$v" ] && continue
            if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best="$v"; fi
        done <<<"$common"
        if [ -z "$best" ]; then
            say "no version of $pkg is offered for all of ${ARCHES[*]}; apt will likely refuse"
            continue
        fi
        say "aligning $pkg: installed $inst is not offered for every architecture; using $best"
        for a in "${ARCHES[@]}"; do echo "$pkg:$a=$best"; done
    done
}

have_rust="$(rust_complete)"
missing_tools="$(tools_missing)"
if [ -n "$have_rust" ] && [ -z "$missing_tools" ]; then
    exit 0
fi
if [ "$CHECK_ONLY" -eq 1 ]; then
    [ -z "$have_rust" ] && say "missing: rustc-web $SERIES with libstd-rust-web-dev for ${ARCHES[*]} at one version"
    [ -n "$missing_tools" ] && say "missing: $(echo $missing_tools)"
    exit 1
fi

for a in arm64 armhf; do
    dpkg --print-foreign-architectures | grep -qx "$a" || $SUDO dpkg --add-architecture "$a"
done
# A mirror mid-sync makes 'apt-get update' fail for one index; the older indexes still serve, and
# pick_version only takes what every architecture offers.
$SUDO apt-get update -qq >/dev/null 2>&1 || say "apt-get update reported errors (mirror sync?); using the indexes there are"

pkgs=(gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross qemu-user-static)
if [ -z "$have_rust" ]; then
    if ! v="$(pick_version)"; then
        say "no version of libstd-rust-web-dev $SERIES.* is offered for all of ${ARCHES[*]} (and rustc-web/cargo-web for amd64)"
        for a in "${ARCHES[@]}"; do say "  $a offers: $(offered libstd-rust-web-dev "$a" | tr '\n' ' ')"; done
        exit 1
    fi
    say "using rustc-web $v for ${ARCHES[*]}"
    pkgs+=("rustc-web=$v" "cargo-web=$v")
    for a in "${ARCHES[@]}"; do pkgs+=("libstd-rust-web-dev:$a=$v"); done
    mapfile -t aligned < <(align_multiarch "$v")
    pkgs+=("${aligned[@]}")
fi
say "installing ${pkgs[*]}"
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades "${pkgs[@]}" >/dev/null 2>&1 \
    || say "apt-get install reported errors; checking what installed"

status=0
if ! v="$(rust_complete)"; then
    say "rustc-web, cargo-web and libstd-rust-web-dev:{${ARCHES[*]// /,}} are still not at one version"
    status=1
fi
missing_tools="$(tools_missing)"
if [ -n "$missing_tools" ]; then
    say "still missing: $(echo $missing_tools)"
    status=1
fi
exit $status
