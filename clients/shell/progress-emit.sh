#!/usr/bin/env bash
# A job that reports its progress with `progress-relay emit`: one command per event; it exits
# non-zero with the relay's reason when the event is rejected or the relay cannot be reached.
#
#   progress-emit.sh [-s SOCKET] [-n STEPS] [-d DELAY] [-b PROGRESS_RELAY] TOPIC
#
# SOCKET defaults to $PROGRESS_RELAY_SOCKET, else /run/progress.sock; TOPIC may also come from
# $PROGRESS_TOPIC. STEPS, a whole number read as decimal (010 is 10), defaults to 10; DELAY,
# the seconds of "work" per step (a decimal number such as 0.2 or 5), to 0.2. A bad argument
# exits 2 with a one-line error. The progress-relay command is -b, else $PROGRESS_RELAY_BIN,
# else `progress-relay` from PATH. When an event cannot be sent the job goes on: progress is
# lost, not the work.
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
        *) sed -n '2,/^[^#]/{/^#/p;}' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
topic="${1:-${PROGRESS_TOPIC:-}}"
[ -n "$topic" ] || { echo "progress-emit: missing TOPIC" >&2; exit 2; }

# Numbers are read as decimal, leading zeros and all: -n 010 is 10 steps, written to the JSON as
# 10 (bash's own arithmetic would read 010 as 8, and 08 not at all). STEPS goes up to 2^53 - 1,
# the largest whole number that every JSON reader (JavaScript's too) holds exactly.
steps_given="$steps"
steps="${steps#"${steps%%[!0]*}"}"             # without its leading zeros
case "$steps" in "" | *[!0123456789]*) steps=0 ;; esac
if ((${#steps} > 16 || steps < 1 || steps > 9007199254740991)); then
    echo "progress-emit: -n STEPS must be a whole number from 1 to 9007199254740991," \
         "not '$steps_given'" >&2
    exit 2
fi
case "$delay" in
    "" | . | *[!0123456789.]* | *.*.*)
        echo "progress-emit: -d DELAY must be a number of seconds such as 0.2 or 5," \
             "not '$delay'" >&2
        exit 2 ;;
esac

# --flag=VALUE: a TOPIC or SOCKET that starts with "-" is still the flag's value.
emit() {
    "$relay_bin" emit --socket="$socket_path" --topic="$topic" "$@" \
        || echo "progress-emit: event not sent (see above); the job goes on" >&2
}

for ((i = 1; i <= steps; i++)); do
    sleep "$delay"                       # the work of one step
    emit --type progress --field "progress=$((i * 100 / steps))" --field "current=$i" \
        --field "total=$steps" --field "message=step $i of $steps" --field status=PROGRESS
done
emit --type complete --field success=true --field message=done --field "result={\"steps\":$steps}"
