#!/usr/bin/env bash
# Measures ferry's footprint: binary size, resident memory idle and with a backlog, and CPU at a
# steady 1,000 messages/s, for the x86_64 release binary natively and for the ARM release binaries
# under qemu-user (make cross builds them; missing ones are skipped).
#
# Each run: a fresh mosquitto and ferry-cloud (host binaries) on free loopback ports, ferry with
# the built-in defaults (journal.max_bytes 256 MiB, cache_bytes 16 MiB: what a 512 MiB gateway with
# an 8 GiB card gets without a board profile).
#   idle RSS     VmRSS 10 s after the MQTT session is up, nothing flowing
#   backlog RSS  VmRSS after ~100,000 messages of ~100 bytes (5,000/s for 20 s) were journaled
#                with the cloud down
#   CPU          ferry's user+system time over 20 s of 1,000 QoS1 messages/s delivered to the cloud,
#                as a percentage of one core
#   writes       /status disk.written_bytes over totals.ingested_bytes during those 20 s
#   threads      ferry's threads at the end, and how many carry no name of their own
# Under qemu, RSS includes the emulator (its translation cache, its own heap) and CPU is the
# emulated cost on this host: upper bounds, not what an ARM core spends.
#
# Usage: [FOOTPRINT_COMMIT_WAIT=50ms] scripts/footprint.sh [x86_64|aarch64|armv7 ...]
#   (default: all that are built; journal.commit_wait 0)
set -euo pipefail
cd "$(dirname "$0")/.."

BACKLOG=100000
BACKLOG_RATE=5000
RATE=1000
SECONDS_AT_RATE=20
# journal.commit_wait for the run (FOOTPRINT_COMMIT_WAIT=50ms scripts/footprint.sh): fewer, larger
# commits at the cost of PUBACK latency.
COMMIT_WAIT="${FOOTPRINT_COMMIT_WAIT:-0ms}"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
wait_for() { # what timeout_s command...
    local what="$1" t="$2"; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || { echo "footprint: timed out waiting for $what" >&2; return 1; }
        sleep 0.2
    done
}
status_field() { # control_port field
    curl -sf "http://127.0.0.1:$1/status" | python3 -c "import json,sys; print(json.load(sys.stdin)$2)"
}
connected() { [ "$(status_field "$CTL" '["mqtt_connected"]')" = True ]; }
# Whether head_seq stayed put for 3 s (the publisher is done; what the broker had is journaled).
head_settled() {
    local a b
    a=$(status_field "$CTL" '["head_seq"]'); sleep 3; b=$(status_field "$CTL" '["head_seq"]')
    [ "$a" -gt 0 ] && [ "$a" = "$b" ]
}
backlog_empty() { [ "$(status_field "$CTL" '["backlog_records"]')" -eq 0 ]; }
# Publishes $2 lines per second for $3 seconds as QoS1 messages. (mosquitto_pub -l loses messages
# when fed faster than it sends, so everything is paced and the results count what ferry got.)
publish() { # port rate seconds
    python3 - "$2" "$3" <<'EOF' | mosquitto_pub -p "$1" -h 127.0.0.1 -q 1 -t sensors/footprint -l
import sys, time
rate, secs = int(sys.argv[1]), int(sys.argv[2])
payload = '{"temp": 21.5, "hum": 40.1, "n": %d, "pad": "' + 'x' * 40 + '"}'
start = time.monotonic()
for i in range(rate * secs):
    if i % max(1, rate // 100) == 0:
        ahead = start + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        sys.stdout.flush()
    print(payload % i)
EOF
}

command -v mosquitto_pub >/dev/null && command -v curl >/dev/null || {
    echo "footprint: needs mosquitto_pub and curl (scripts/ensure-deps.sh)" >&2; exit 1; }
[ -x target/release/ferry-cloud ] && [ -x target/release/ferry ] || cargo build --release -p ferry -p ferry-cloud
mosquitto=/usr/sbin/mosquitto; [ -x $mosquitto ] || mosquitto=mosquitto

PIDS=() DIRS=()
cleanup() {
    [ ${#PIDS[@]} -gt 0 ] && kill "${PIDS[@]}" 2>/dev/null && wait "${PIDS[@]}" 2>/dev/null
    [ ${#DIRS[@]} -gt 0 ] && rm -rf "${DIRS[@]}"
    PIDS=() DIRS=()
    return 0
}
trap cleanup EXIT

run_one() { # label binary runner...
    local label="$1" bin="$2"; shift 2
    local dir; dir="$(mktemp -d)"
    DIRS+=("$dir")
    local mport cport ctl
    mport=$(free_port); cport=$(free_port); ctl=$(free_port)
    printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\nmax_inflight_messages 100\npersistence false\n' \
        "$mport" > "$dir/mosquitto.conf"
    [ "$(id -u)" -eq 0 ] || sed -i '/^user root/d' "$dir/mosquitto.conf"
    $mosquitto -c "$dir/mosquitto.conf" >/dev/null 2>&1 & PIDS+=($!)
    cat > "$dir/ferry.toml" <<EOF
[device]
id = "gw-footprint"
[mqtt]
host = "127.0.0.1"
port = $mport
topics = ["sensors/#"]
[journal]
dir = "$dir/journal"
commit_wait = "$COMMIT_WAIT"
[uplink]
url = "http://127.0.0.1:$cport/v1/ingest"
max_backoff = "1s"
[control]
listen = "127.0.0.1:$ctl"
[clock]
require_sync = false
EOF
    "$@" "$bin" run -c "$dir/ferry.toml" 2>"$dir/ferry.log" & local fpid=$!
    PIDS+=($fpid)
    CTL=$ctl
    wait_for "ferry's MQTT session" 60 connected
    sleep 10
    local idle; idle=$(rss_kib $fpid)

    # A backlog: the cloud is not running yet.
    publish "$mport" "$BACKLOG_RATE" $((BACKLOG / BACKLOG_RATE))
    wait_for "the backlog to be journaled" 600 head_settled
    local backlog; backlog=$(rss_kib $fpid)
    local records; records=$(status_field "$ctl" '["backlog_records"]')
    local disk; disk=$(status_field "$ctl" '["journal_disk_bytes"]')

    # Drain it, then a steady rate.
    target/release/ferry-cloud --listen "127.0.0.1:$cport" --data "$dir/cloud" >/dev/null 2>&1 & PIDS+=($!)
    wait_for "the backlog to drain" 900 backlog_empty
    local t0 c0 t1 c1 hz
    hz=$(getconf CLK_TCK)
    local n0 n1
    t0=$(date +%s.%N); c0=$(cpu_ticks $fpid); n0=$(status_field "$ctl" '["totals"]["ingested"]')
    local w0 p0 w1 p1
    w0=$(status_field "$ctl" '["disk"]["written_bytes"]'); p0=$(status_field "$ctl" '["totals"]["ingested_bytes"]')
    publish "$mport" "$RATE" "$SECONDS_AT_RATE"
    t1=$(date +%s.%N); c1=$(cpu_ticks $fpid); n1=$(status_field "$ctl" '["totals"]["ingested"]')
    w1=$(status_field "$ctl" '["disk"]["written_bytes"]'); p1=$(status_field "$ctl" '["totals"]["ingested_bytes"]')
    local after; after=$(rss_kib $fpid)
    # Threads: how many, and how many besides the main thread (whose name is the process's)
    # have no name of their own.
    local threads unnamed
    threads=$(ls /proc/$fpid/task | wc -l)
    unnamed=$(for t in /proc/$fpid/task/*; do [ "${t##*/}" = "$fpid" ] || cat "$t/comm"; done |
        grep -cx "$(cat /proc/$fpid/comm)" || true)
    awk -v l="$label" -v s="$(stat -c %s "$bin")" -v i="$idle" -v b="$backlog" -v a="$after" -v d="$disk" \
        -v n="$records" -v c=$((c1 - c0)) -v hz="$hz" -v t0="$t0" -v t1="$t1" -v m=$((n1 - n0)) \
        -v w=$((w1 - w0)) -v p=$((p1 - p0)) -v th="$threads" -v un="$unnamed" 'BEGIN {
        secs = t1 - t0; rate = m / secs; cpu = 100 * c / hz / secs
        printf "| %s | %.2f MiB | %.1f MiB | %.1f MiB (%d records, journal %.0f MiB on disk) | %.1f MiB | %.1f %% of a core at %.0f msg/s: %.1f %% per 1,000 msg/s | %.2f | %d (main and %d unnamed) |\n",
            l, s / 1048576, i / 1024, b / 1024, n, d / 1048576, a / 1024, cpu, rate, cpu * 1000 / rate, (p > 0 ? w / p : 0), th, un
    }'
    cleanup
}

arm() { # label triple runner
    local b=target/arm/$2/release/ferry
    [ -x "$b" ] || b=target/$2/release/ferry   # built by cross
    if [ -x "$b" ]; then
        run_one "$1 (qemu-user)" "$b" "$3"
    else
        echo "footprint: no $2 build (make cross TARGET=$2)" >&2
    fi
}

want=("$@")
[ ${#want[@]} -eq 0 ] && want=(x86_64 aarch64 armv7)
echo "| target | binary | RSS idle | RSS with a backlog (cloud down) | RSS at 1,000 msg/s | CPU at 1,000 msg/s | bytes written per payload byte at 1,000 msg/s | threads |"
echo "|---|---|---|---|---|---|---|---|"
for w in "${want[@]}"; do
    case "$w" in
        x86_64) run_one "x86_64 (native)" target/release/ferry ;;
        aarch64) arm aarch64 aarch64-unknown-linux-gnu qemu-aarch64-static ;;
        armv7) arm armv7 armv7-unknown-linux-gnueabihf qemu-arm-static ;;
        *) echo "footprint: unknown target $w" >&2; exit 2 ;;
    esac
done
