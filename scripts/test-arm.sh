#!/usr/bin/env bash
# The test suite built for ARM and run under qemu-user (Debian's qemu-user-static), on an x86_64
# host without Docker: Debian's cargo 1.85, the multiarch std, the gcc cross linkers
# (scripts/ensure-cross.sh). cargo runs each test binary through the target's `runner`
# (.cargo/config.toml); the tests spawn the ARM `ferry` and `ferry-cloud` through
# FERRY_TEST_RUNNER (tests/util/mod.rs), since this host may have no binfmt_misc registration.
# mosquitto and nginx are the host's own x86_64 ones: the network is shared.
#
# Usage: scripts/test-arm.sh [--ci] [TARGET...]
#   --ci   only what CI requires on ARM: the end-to-end outage test (tests/pipeline.rs) and the
#          crash tests (tests/crash.rs)
#   default targets: aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
set -euo pipefail
cd "$(dirname "$0")/.."

ci=0
if [ "${1:-}" = "--ci" ]; then ci=1; shift; fi
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
MSRV_CARGO="${MSRV_CARGO:-/usr/bin/cargo}"

scripts/ensure-cross.sh || { echo "test-arm: the Debian cross toolchain is incomplete (see above)" >&2; exit 1; }

if [ "$ci" -eq 1 ]; then
    build=(--test pipeline --test crash)
    filters=(-- --exact outage_loses_nothing_and_delivers_in_order sigkill_at_random_moments_loses_nothing
        a_crash_between_fsync_and_puback_does_not_journal_redeliveries_twice
        a_puback_backlog_beyond_the_redelivery_marks_journals_nothing_twice)
else
    build=(--no-fail-fast -p ferry -p ferry-cloud -p ferry-journal -p ferry-protocol -p ferry-tls -p ferry-util --lib --bins --tests)
    # Tests that cannot pass under qemu-user on this host, each for a reason of the emulator, not of
    # ARM (they pass natively and are worth running on a real board):
    # - console: qemu-user 7.2 answers TCGETS2/TCSETS2 (rustix's termios calls) with ENOSYS;
    # - reload's restart: the agent re-executes itself, and without binfmt_misc the kernel cannot
    #   execute an ARM binary (ENOEXEC), so it exits for its supervisor instead;
    # - the 502 storm's memory check and the pushback drain: qemu's own memory per guest thread and
    #   its speed move the numbers these tests bound.
    filters=(-- --skip a_pin_guards_the_console --skip a_technician_sets_the_uplink_url
        --skip a_typo_names_the_key --skip power_loss_during_save --skip regenerating_the_identity
        --skip the_console_runs_on_its_own_terminal --skip the_agents_console_survives_line_noise
        --skip the_journal_command_shows_the_age --skip a_new_topic_restarts_the_agent_in_place
        --skip nginx_502_storm_leaks_nothing --skip pushback_from_the_cloud_slows_the_drain)
fi

# No debug info: it doubles link time and binary size on a 2-core builder, and qemu gains
# nothing from it. The test profile stays unoptimised, as on the host.
export CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0
for t in "${targets[@]}"; do
    case "$t" in
        aarch64-unknown-linux-gnu) runner=qemu-aarch64-static ;;
        armv7-unknown-linux-gnueabihf) runner=qemu-arm-static ;;
        *) echo "test-arm: unsupported target $t" >&2; exit 2 ;;
    esac
    start=$(date +%s)
    # ferry-cloud is a package of its own: the agent's tests find it beside them (tests/util).
    PATH=/usr/bin:$PATH CARGO_TARGET_DIR=target/arm "$MSRV_CARGO" build --locked --target "$t" -p ferry-cloud
    PATH=/usr/bin:$PATH CARGO_TARGET_DIR=target/arm "$MSRV_CARGO" test --locked --target "$t" --no-run "${build[@]}"
    built=$(date +%s)
    echo "test-arm: $t built in $((built - start)) s; running under $runner" >&2
    FERRY_TEST_RUNNER="$runner" PATH=/usr/bin:$PATH CARGO_TARGET_DIR=target/arm \
        "$MSRV_CARGO" test --locked --target "$t" "${build[@]}" "${filters[@]}"
    echo "test-arm: $t built in $((built - start)) s, ran in $(( $(date +%s) - built )) s" >&2
done
