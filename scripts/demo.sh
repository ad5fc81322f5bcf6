#!/usr/bin/env bash
# The outage story from the field, told in one run:
#   a local mosquitto, the reference cloud and ferry start; devices publish; the cloud goes away;
#   devices keep publishing (ferry journals, the backlog grows); the cloud comes back; ferry
#   replays from its cursor; every message is at the cloud exactly once, in order. Then the cloud
#   sends a command down the WebSocket: a message to a device, through the local broker.
# Everything lives in ./demo-data (removed at the start of each run). Ports: $MQTT_PORT,
# $CLOUD_PORT, $CONTROL_PORT, $WS_PORT (defaults 18830, 18080, 19100, 18081).
set -euo pipefail
cd "$(dirname "$0")/.."

MQTT_PORT=${MQTT_PORT:-18830}
CLOUD_PORT=${CLOUD_PORT:-18080}
CONTROL_PORT=${CONTROL_PORT:-19100}
WS_PORT=${WS_PORT:-18081}
PHASE=${PHASE:-2000}            # messages per phase
BIN=target/release
DATA=$PWD/demo-data
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$MQTT_PORT" "$CLOUD_PORT" "$CONTROL_PORT" "$WS_PORT"; do
    if port_busy "$p"; then echo "port $p is in use; set MQTT_PORT/CLOUD_PORT/CONTROL_PORT/WS_PORT" >&2; exit 1; fi
done

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

rm -rf "$DATA"; mkdir -p "$DATA"/{mqtt,cloud,agent}
# As root, mosquitto drops to its own user, which could not write its persistence file here.
[ "$(id -u)" -eq 0 ] && echo "user root" > "$DATA/mosquitto.conf"
cat >> "$DATA/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $DATA/mqtt/
max_queued_messages 1000000
max_packet_size 262144
log_dest file $DATA/mqtt/mosquitto.log
CONF
cat > "$DATA/ferry.toml" <<CONF
[device]
id = "gw-demo"
[mqtt]
port = $MQTT_PORT
topics = ["sensors/#"]
[journal]
dir = "$DATA/agent/journal"
max_bytes = "64MiB"
[uplink]
url = "http://127.0.0.1:$CLOUD_PORT/v1/ingest"
max_backoff = "2s"
[control]
listen = "127.0.0.1:$CONTROL_PORT"
[clock]
# A laptop or container may report an unsynchronised clock: trust it (see README, Timestamps).
require_sync = false
[downlink]
url = "ws://127.0.0.1:$WS_PORT/v1/downlink"
max_backoff = "2s"
CONF

wait_for() { # what, command...
    local what=$1; shift
    for _ in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for $what" >&2; exit 1
}
start_cloud() {
    "$BIN/ferry-cloud" --listen "127.0.0.1:$CLOUD_PORT" --ws-listen "127.0.0.1:$WS_PORT" --data "$DATA/cloud" > "$DATA/cloud/stdout" 2>>"$DATA/cloud/cloud.log" &
    CLOUD_PID=$!; pids+=("$CLOUD_PID")
    wait_for "ferry-cloud" port_busy "$CLOUD_PORT"
}
cloud_count() { curl_get "/v1/devices" | sed -n 's/.*"records":\([0-9]*\).*/\1/p' | head -1; }
curl_get() { # GET from the cloud without curl: bash /dev/tcp
    exec 5<>"/dev/tcp/127.0.0.1/$CLOUD_PORT"
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$1" >&5
    sed '1,/^\r$/d' <&5; exec 5<&-
}
downlink_up() { curl_get /v1/devices/gw-demo/downlink | grep -q '"connected":true'; }
curl_post() { # path body
    exec 5<>"/dev/tcp/127.0.0.1/$CLOUD_PORT"
    printf 'POST %s HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' "$1" "${#2}" "$2" >&5
    sed '1,/^\r$/d' <&5; exec 5<&-
}
status_line() {
    "$BIN/ferry" status -c "$DATA/ferry.toml" --json 2>/dev/null | tr -d ' \n' \
      | sed -E 's/.*"head_seq":([0-9]+).*"acked_seq":([0-9]+).*"backlog_records":([0-9]+).*"uplink":\{"state":"([a-z]+)".*/journaled=\1 acked=\2 backlog=\3 uplink=\4/'
}
publish() { # from to
    seq "$1" "$(( $2 - 1 ))" | sed 's/.*/{"n":&,"t":21.5}/' \
      | mosquitto_pub -p "$MQTT_PORT" -q 1 -t sensors/demo -l
}

say "starting mosquitto on 127.0.0.1:$MQTT_PORT, ferry-cloud on :$CLOUD_PORT"
"$MOSQUITTO" -c "$DATA/mosquitto.conf" 2>>"$DATA/mqtt/stderr" & pids+=($!)
wait_for mosquitto port_busy "$MQTT_PORT"
start_cloud

say "starting ferry (status on 127.0.0.1:$CONTROL_PORT, log in demo-data/agent/ferry.log)"
FERRY_LOG=info "$BIN/ferry" run -c "$DATA/ferry.toml" 2> "$DATA/agent/ferry.log" & FERRY_PID=$!; pids+=("$FERRY_PID")
wait_for "ferry" port_busy "$CONTROL_PORT"
wait_for "ferry's mqtt session" sh -c "'$BIN/ferry' status -c '$DATA/ferry.toml' --json | grep -q '\"mqtt_connected\": true'"

say "phase 1: devices publish $PHASE messages; the link is up"
publish 0 "$PHASE"
for _ in $(seq 1 100); do echo "  $(status_line)"; [ "$(cloud_count)" = "$PHASE" ] && break; sleep 0.3; done

say "phase 2: the cloud goes away (kill ferry-cloud); devices publish $PHASE more"
kill "$CLOUD_PID"; wait "$CLOUD_PID" 2>/dev/null || true
publish "$PHASE" "$(( 2 * PHASE ))"
for _ in $(seq 1 10); do echo "  $(status_line)"; sleep 0.5; done

say "phase 3: the cloud comes back; ferry replays from its cursor"
start_cloud
TOTAL=$(( 2 * PHASE ))
for _ in $(seq 1 200); do
    n=$(cloud_count); echo "  $(status_line)  cloud_records=${n:-0}"
    [ "${n:-0}" -ge "$TOTAL" ] && break; sleep 0.5
done

say "verdict"
curl_get "/v1/devices/gw-demo/records" > "$DATA/records.ndjson"
awk -v total="$TOTAL" '
    function num(key,   re) { re = "\"" key "\":[0-9]+"; if (!match($0, re)) return -1; return substr($0, RSTART + length(key) + 3, RLENGTH - length(key) - 3) + 0 }
    # Two uploads may be in flight, so the cloud can store a batch before the one ahead of it:
    # order is checked by seq (each message took its seq in publish order), not by file line.
    NF { n = num("n"); s = num("seq"); count++
         if (n != s - 1) order_ok = 0
         if (s < 1 || s > total || has[s]++) seq_ok = 0
         if (seen[n]++) dup++ }
    BEGIN { order_ok = 1; seq_ok = 1; dup = 0 }
    END {
        for (i = 1; i <= total; i++) if (!(i in has)) seq_ok = 0
        printf "  records at the cloud: %d (expected %d)\n", count, total
        printf "  duplicates: %d; in publish order: %s; seqs 1..%d without holes: %s\n", dup, order_ok ? "yes" : "NO", total, seq_ok ? "yes" : "NO"
        exit !(count == total && order_ok && seq_ok && dup == 0)
    }' "$DATA/records.ndjson" || { echo "DEMO FAILED: see demo-data/"; exit 1; }
"$BIN/ferry" status -c "$DATA/ferry.toml" | sed 's/^/  /'

say "downlink: the cloud sends a command to a device (ws://127.0.0.1:$WS_PORT, through the broker)"
mosquitto_sub -p "$MQTT_PORT" -t devices/valve-1/cmd -C 1 -W 20 > "$DATA/device.out" & SUB=$!; pids+=("$SUB")
sleep 0.5  # the subscription is in place before the command is sent
wait_for "the downlink" downlink_up
CMD=$(curl_post /v1/devices/gw-demo/commands '{"action":"publish","topic":"devices/valve-1/cmd","payload":{"open":true}}' \
      | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
for _ in $(seq 1 50); do
    r=$(curl_get "/v1/devices/gw-demo/commands/$CMD"); echo "$r" | grep -q '"state":"done"' && break; sleep 0.2
done
echo "  command $CMD: $r"
wait "$SUB" 2>/dev/null || true
echo "  the device received: $(cat "$DATA/device.out")"
grep -q '"open":true' "$DATA/device.out" || { echo "DEMO FAILED: the device got no command"; exit 1; }
say "demo passed: nothing was lost across the outage, and the cloud reached a device"
say "the operators' console: http://127.0.0.1:$CLOUD_PORT/console (open on loopback: no token)"
if [ -t 0 ]; then
    echo "  the demo keeps running for it; press Ctrl-C to stop everything"
    wait "$CLOUD_PID" 2>/dev/null || true
fi
