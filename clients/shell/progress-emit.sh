#!/usr/bin/env bash
# A job that reports its progress with `progress-relay emit`: one command per event; it exits
# non-zero with the relay's reason when the event is rejected or the relay cannot be reached.
#
#   progress-emit.sh [-s SOCKET] [-n STEPS] [-d DELAY] [-b PROGRESS_RELAY] TOPIC
#
# SOCKET defaults to $PROGRESS_RELAY_SOCKET, else /run/progress.sock; TOPIC may also come from
# $PROGRESS_TOPIC. STEPS defaults to 10, DELAY (seconds of "work" per step) to 0.2. The
# progress-relay command is -b, else $PROGRESS_RELAY_BIN, else `progress-relay` from PATH.
# When an event cannot be sent the job goes on: progress is lost, not the work.
set -u

socket_path="${PROGRESS_RELAY_SOCKET:-/run/progress.sock}"
steps=10
delay=0.2
relay_bin="${PROGRESS_RELAY_BIN:-progress-relay}"
while getopts "s:n:d:b:h" opt; do
    case "$opt" in
        s) socket_path="$OPTARG" ;;
        n) steps="$OPTARG" ;;
        d) delay="$OPTARG" ;;
        b) relay_bin="$OPTARG" ;;
        *) sed -n '2,12p' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
topic="${1:-${PROGRESS_TOPIC:-}}"
[ -n "$topic" ] || { echo "progress-emit: missing TOPIC" >&2; exit 2; }
case "$steps" in "" | *[!0-9]* | 0) echo "progress-emit: STEPS must be a positive integer" >&2; exit 2 ;; esac

emit() {
    "$relay_bin" emit --socket "$socket_path" --topic "$topic" "$@" \
        || echo "progress-emit: event not sent (see above); the job goes on" >&2
}

for ((i = 1; i <= steps; i++)); do
    sleep "$delay"                       # the work of one step
    emit --type progress --field "progress=$((i * 100 / steps))" --field "current=$i" \
        --field "total=$steps" --field "message=step $i of $steps" --field status=PROGRESS
done
emit --type complete --field success=true --field message=done --field "result={\"steps\":$steps}"
