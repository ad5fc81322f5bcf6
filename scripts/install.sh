#!/usr/bin/env bash
# Installs a built ferry binary and a board profile (board/<name>/) onto a target root: a directory
# (a mounted image, a test's temp dir, or / on the gateway itself), or a gateway over SSH.
#
#   scripts/install.sh --board NAME --binary PATH --root DIR [--replace-config] [--force]
#   scripts/install.sh --board NAME --binary PATH --ssh [USER@]HOST [--root DIR] [...]
#
# What goes where (under the root):
#   usr/bin/ferry                          the binary (replaced)
#   usr/lib/systemd/system/ferry.service   the unit (replaced; local changes belong in drop-ins)
#   usr/lib/sysusers.d/ferry.conf          the `ferry` system user (systemd-sysusers creates it)
#   usr/lib/tmpfiles.d/ferry.conf          the journal directory, 0700 ferry:ferry, and the config's
#                                          owner and mode (systemd-tmpfiles applies them)
#   etc/ferry/ferry.toml                   the board's default config      } never overwritten
#   etc/mosquitto/conf.d/ferry.conf        the board's mosquitto settings  } silently (below)
#   usr/share/doc/ferry/README.md          the board's README
#   <journal dir>                          created 0700 (owner set by tmpfiles on the gateway)
#
# Configs: a missing one is installed; an identical one is left alone; a different one (someone
# edited it) is kept, and the board's default is written beside it as `<file>.new`. With
# --replace-config the existing file is first copied to `<file>.bak-<UTC time>`, then replaced.
# Either way the script says what it did.
#
# With --root / on a systemd machine it then runs systemd-sysusers, systemd-tmpfiles --create and
# systemctl daemon-reload; it never starts or enables the service (the README's first-boot steps).
# --ssh copies the binary, the board profile and this script to HOST in one stream and runs it
# there as the SSH user (root, or a user with passwordless sudo); $SSH overrides the ssh command.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
boards="$here/../board"

board="" binary="" root="" ssh_host="" replace=0 force=0
usage() { sed -n '5,6p' "$0" | sed 's/^# *//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --board) board="${2:-}"; shift 2 ;;
        --binary) binary="${2:-}"; shift 2 ;;
        --root) root="${2:-}"; shift 2 ;;
        --ssh) ssh_host="${2:-}"; shift 2 ;;
        --replace-config) replace=1; shift ;;
        --force) force=1; shift ;;
        -h | --help) usage ;;
        *) echo "install: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$board" ] && [ -n "$binary" ] || usage
[ -n "$root" ] || [ -n "$ssh_host" ] || usage
profile="$boards/$board"
[ -f "$profile/ferry.toml" ] || {
    echo "install: no board profile $board (have: $(cd "$boards" && ls -d */ | grep -v common | tr -d / | tr '\n' ' '))" >&2
    exit 2
}
[ -f "$binary" ] || { echo "install: no binary at $binary" >&2; exit 2; }

# The binary must be for the board's CPU (ELF e_machine at offset 18, little-endian).
machine="$(od -An -tu2 -j18 -N2 "$binary" | tr -d ' ')"
case "$board" in
    *aarch64*) want=183 name=aarch64 ;;
    armv7*) want=40 name=arm ;;
    x86_64*) want=62 name=x86-64 ;;
    *) want="" name="" ;;
esac
if [ -n "$want" ] && [ "$machine" != "$want" ] && [ "$force" -eq 0 ]; then
    echo "install: $binary is not an $name executable (ELF machine $machine), board $board needs one; --force to install anyway" >&2
    exit 2
fi

if [ -n "$ssh_host" ]; then
    stage="$(mktemp -d)"
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/scripts" "$stage/board/$board" "$stage/board/common"
    cp "$0" "$stage/scripts/install.sh"
    cp "$binary" "$stage/ferry"
    cp -R "$profile/." "$stage/board/$board/"
    cp -R "$boards/common/." "$stage/board/common/"
    flags=""
    [ "$replace" -eq 1 ] && flags="$flags --replace-config"
    [ "$force" -eq 1 ] && flags="$flags --force"
    remote_root="${root:-/}"
    echo "install: $board onto $ssh_host:$remote_root" >&2
    # One stream, one connection; the remote temp dir is removed whatever happens.
    tar -C "$stage" -cf - . | ${SSH:-ssh} "$ssh_host" \
        "s=; [ \$(id -u) -eq 0 ] || s=sudo; d=\$(mktemp -d) && tar -C \"\$d\" -xf - && \$s bash \"\$d/scripts/install.sh\" --board '$board' --binary \"\$d/ferry\" --root '$remote_root'$flags; rc=\$?; rm -rf \"\$d\"; exit \$rc"
    exit $?
fi

say() { echo "install: $*" >&2; }
root="${root%/}"   # "/" becomes "", so that "$root/etc" is /etc
[ -z "$root" ] || mkdir -p "$root"

# Replaces a file atomically (write beside it, then rename), so a power cut leaves old or new.
put() { # src dst mode
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.tmp.$$"
    chmod "$3" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
}

# A config: installed when missing, left when identical, otherwise kept (see the header).
put_config() { # src dst mode
    if [ ! -e "$2" ]; then
        put "$1" "$2" "$3"
        say "installed ${2#"$root"}"
    elif cmp -s "$1" "$2"; then
        say "unchanged ${2#"$root"}"
    elif [ "$replace" -eq 1 ]; then
        local bak
        bak="$2.bak-$(date -u +%Y%m%dT%H%M%SZ)"
        cp -p "$2" "$bak"
        put "$1" "$2" "$3"
        say "replaced ${2#"$root"}; the previous one is ${bak#"$root"}"
    else
        put "$1" "$2.new" "$3"
        say "kept ${2#"$root"} (it differs from the board's default, written as ${2#"$root"}.new)"
    fi
}

put "$binary" "$root/usr/bin/ferry" 0755
say "installed /usr/bin/ferry"
put "$profile/ferry.service" "$root/usr/lib/systemd/system/ferry.service" 0644
put "$boards/common/ferry.sysusers" "$root/usr/lib/sysusers.d/ferry.conf" 0644
put "$profile/ferry.tmpfiles" "$root/usr/lib/tmpfiles.d/ferry.conf" 0644
put "$profile/README.md" "$root/usr/share/doc/ferry/README.md" 0644
say "installed the unit, sysusers.d and tmpfiles.d entries, /usr/share/doc/ferry/README.md"
mkdir -p "$root/etc/ferry"
chmod 0750 "$root/etc/ferry"
put_config "$profile/ferry.toml" "$root/etc/ferry/ferry.toml" 0640
put_config "$profile/mosquitto.conf" "$root/etc/mosquitto/conf.d/ferry.conf" 0644

# The journal directory from the tmpfiles entry (`d <dir> 0700 ferry ferry -`).
journal="$(awk '$1 == "d" { print $2; exit }' "$profile/ferry.tmpfiles")"
mkdir -p "$root$journal"
chmod 0700 "$root$journal"
say "journal directory $journal (0700)"

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemd-sysusers /usr/lib/sysusers.d/ferry.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/ferry.conf
    systemctl daemon-reload
    say "created user ferry, applied tmpfiles, reloaded systemd; next: edit /etc/ferry/ferry.toml, then systemctl enable --now ferry"
fi
