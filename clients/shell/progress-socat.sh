#!/usr/bin/env bash
# A job that reports its progress to progress-relay with socat: one connection for the whole
# job, one JSON line per step, then a "complete" event.
#
#   progress-socat.sh [-s SOCKET] [-n STEPS] [-d DELAY] TOPIC
#
# SOCKET defaults to $PROGRESS_RELAY_SOCKET, else /run/progress.sock; TOPIC may also come from
# $PROGRESS_TOPIC. STEPS, a whole number read as decimal (010 is 10), defaults to 10; DELAY,
# the seconds of "work" per step (a decimal number such as 0.2 or 5), to 0.2. A bad argument
# exits 2 with a one-line error. The relay's answers (only for rejected lines) are shown on
# standard error. When the relay cannot be reached the job still runs to the end: progress is
# lost, not the work.
set -u

socket_path="${PROGRESS_RELAY_SOCKET:-/run/progress.sock}"
steps=10
delay=0.2
while getopts "s:n:d:h" opt; do
    case "$opt" in
        s) socket_path="$OPTARG" ;;
        n) steps="$OPTARG" ;;
        d) delay="$OPTARG" ;;
        *) sed -n '2,/^[^#]/{/^#/p;}' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
topic="${1:-${PROGRESS_TOPIC:-}}"

# The relay's topic characters need no JSON escaping: check them.
case "$topic" in
    "" | *[!A-Za-z0-9_.:/@=-]*) echo "progress-socat: bad or missing TOPIC: '$topic'" >&2; exit 2 ;;
esac

# Numbers are read as decimal, leading zeros and all: -n 010 is 10 steps, written to the JSON as
# 10 (bash's own arithmetic would read 010 as 8, and 08 not at all). STEPS goes up to 2^53 - 1,
# the largest whole number that every JSON reader (JavaScript's too) holds exactly.
steps_given="$steps"
steps="${steps#"${steps%%[!0]*}"}"             # without its leading zeros
case "$steps" in "" | *[!0123456789]*) steps=0 ;; esac
if ((${#steps} > 16 || steps < 1 || steps > 9007199254740991)); then
    echo "progress-socat: -n STEPS must be a whole number from 1 to 9007199254740991," \
         "not '$steps_given'" >&2
    exit 2
fi
case "$delay" in
    "" | . | *[!0123456789.]* | *.*.*)
        echo "progress-socat: -d DELAY must be a number of seconds such as 0.2 or 5," \
             "not '$delay'" >&2
        exit 2 ;;
esac
command -v socat >/dev/null || { echo "progress-socat: socat is not installed" >&2; exit 2; }

# One connection for the whole job: the relay publishes the lines of one connection in order.
# A failed write must not kill the job: ignore SIGPIPE, so that it is an error we can ignore.
trap '' PIPE
exec 3> >(socat - "UNIX-CONNECT:$socket_path" >&2 \
              || echo "progress-socat: cannot reach the relay at $socket_path" >&2)
relay_pid=$!

emit() {
    printf '%s\n' "$1" >&3 2>/dev/null || true
}

for ((i = 1; i <= steps; i++)); do
    sleep "$delay"                       # the work of one step
    emit "{\"topic\":\"$topic\",\"type\":\"progress\",\"progress\":$((i * 100 / steps)),\"current\":$i,\"total\":$steps,\"message\":\"step $i of $steps\",\"status\":\"PROGRESS\"}"
done
emit "{\"topic\":\"$topic\",\"type\":\"complete\",\"success\":true,\"message\":\"done\",\"result\":{\"steps\":$steps}}"

exec 3>&-                                # end of input: socat writes the rest and exits
wait "$relay_pid" 2>/dev/null || true
