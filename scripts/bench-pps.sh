#!/usr/bin/env bash
# Packet rate into moat, against a peer measured in the same run.
#
# dpdk-testpmd is the guest side: a virtio-user frontend in txonly mode (pinned to CPU 1),
# sending as fast as it can. The receiver (pinned to CPU 0) is one of:
#   ceiling       DPDK's own vhost PMD in rxonly mode (receives and frees: the upper bound of
#                 a vhost-user backend on this machine)
#   moat-drop     moat serve --policy policy/deny-all.toml, testpmd's default frames (dst MAC
#                 not the gateway): dropped after the Ethernet header
#   moat-drop-ip  the same moat, frames addressed to the gateway MAC from the guest's IP to
#                 gateway UDP port 9: parsed through IPv4/UDP and the firewall, dropped as
#                 gateway_port_closed
#   moat-answer   the answer path: real DNS queries to the gateway ("moat." A IN, one
#                 question each, distinct IDs and ports, padded to the frame size with EDNS0
#                 padding; scripts/dns-pcap.py), which moat parses and answers (NXDOMAIN under
#                 deny-all). For these cases the frontend is not txonly: testpmd replays the
#                 queries from a pcap (net_pcap, infinite_rx) into the virtio-user port in io
#                 mode and reads the virtio-user RX ring (dropping what it reads), so the
#                 figure is answers that arrived in the guest's RX ring, counted by the guest.
#                 The guest still offers queries as fast as it can, faster than it reads: the
#                 answers moat built but found no RX buffer for are reported apart (drop
#                 rx_queue_full), not counted as answered.
#   passt         passt --vhost-user (only with PASST=/path/to/passt; Debian 12's passt,
#                 0.0~git20230309, predates --vhost-user: build a 2024-11 or later passt)
# for 64 B and 1518 B frames (--txpkts). Note: deny-all.toml has mtu 1500, so moat takes
# at most 1514-byte frames: for 1518 B frames moat runs with deny-all.toml plus `mtu = 1504`,
# so they are parsed and dropped (or answered) like the 64 B ones, not dropped as oversized.
#
# Mpps is the receiver's own counter over a measured time: moat's traffic.tx_frames through
# its control socket (`moat stats --json`) over the wall time between the two reads; the vhost
# PMD's RX-packets from its periodic statistics within the window, over the periods testpmd
# itself measured (TSC); passt has no counter, so its figure is the frames testpmd got into
# the ring (TX-packets, same method), which passt had to consume. The answer cases (moat and
# the PMD's macswap alike) count at the guest: the frontend's virtio-user RX-packets, same
# method. CPU is the receiver's, from /proc/PID/task/*/schedstat (ns on CPU).
#
# Env: MOAT_PPS_SECS (default 10; 3 with MOAT_BENCH_QUICK=1), PASST, MOAT_PPS_SIZES
# (default "64 1518"), MOAT_PPS_KEEP=1 keeps the testpmd and moat logs. Prints a table; appends raw numbers to target/bench/pps.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=${MOAT_BENCH_QUICK:-0}
[ "$quick" = 0 ] && quick=""
secs=${MOAT_PPS_SECS:-$([ -n "$quick" ] && echo 3 || echo 10)}
sizes=${MOAT_PPS_SIZES:-"64 1518"}
moat=${MOAT_BENCH_BIN:-target/release/moat} # MOAT_BENCH_BIN: another moat (bench.sh MOAT_BENCH_BEFORE)
out=target/bench
mkdir -p "$out"
raw="$out/pps.txt"

if ! command -v dpdk-testpmd >/dev/null; then
  echo "bench-pps: dpdk-testpmd missing (apt-get install dpdk-dev); skipped" >&2
  echo "# $(date -u +%FT%TZ) skipped: dpdk-testpmd missing" >>"$raw"
  exit 0
fi
[ -x "$moat" ] || cargo build --release --quiet

work=$(mktemp -d /tmp/moat-pps.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do
    kill -INT "$p" 2>/dev/null || true
  done
  sleep 0.5
  for p in "${pids[@]}"; do
    kill -KILL "$p" 2>/dev/null || true
    # Reap it here, so that bash's "Killed" notice goes nowhere instead of to the terminal.
    wait "$p" 2>/dev/null || true
  done
  if [ -n "${MOAT_PPS_KEEP:-}" ]; then
    echo "bench-pps: logs kept in $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cpu_ns() { # ns on CPU, all threads of $1
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}'
}

stamp() { # prefix each line with the wall time it was read at
  local line
  while IFS= read -r line; do
    printf '%s %s\n' "$EPOCHREALTIME" "$line"
  done
}

now() { printf '%s\n' "$EPOCHREALTIME"; }

wait_for() { # wait_for SECONDS CMD...: until CMD succeeds
  local until=$((SECONDS + $1))
  shift
  until "$@"; do
    [ $SECONDS -lt $until ] || return 1
    sleep 0.1
  done
}

# The last value of `key` (e.g. RX-packets:) in a stamped testpmd log at or before time $3,
# printed as "stamp value".
stat_at() { # stat_at FILE KEY TIME
  awk -v key="$2" -v t="$3" '
    { for (i = 2; i < NF; i++) if ($i == key && $1 <= t) { s = $1; v = $(i + 1) } }
    END { if (s != "") print s, v }' "$1"
}

# Frames and seconds within [T0, T1] from testpmd's periodic statistics: each block's
# counter delta, and its own period from that delta and the rate testpmd measured (TSC), so
# the figure does not depend on when the lines were read (a starved reader stamps late).
pmd_window() { # pmd_window FILE COUNT_KEY PPS_KEY T0 T1 [PORT] -> "frames seconds"
  awk -v ck="$2" -v pk="$3" -v t0="$4" -v t1="$5" -v port="${6:-}" '
    { for (i = 2; i < NF; i++) if ($i == "statistics" && $(i + 1) == "for" && $(i + 2) == "port") cur = $(i + 3) }
    port != "" && cur != port { next }
    { for (i = 2; i < NF; i++) {
        if ($i == ck && $(i + 2) != "RX-dropped:" && $(i + 2) != "TX-dropped:") { stamp = $1; cnt = $(i + 1) }
        if ($i == pk) {
          d = cnt - prev; prev = cnt
          if (stamp >= t0 && stamp <= t1 && $(i + 1) > 0) { n += d; t += d / $(i + 1) }
        }
    } }
    END { printf "%.0f %.6f\n", n, t }' "$1"
}

sending() { # the txonly side has put frames in the ring
  [ -f "$1" ] || return 1
  awk '{ for (i = 2; i < NF; i++) if ($i == "TX-packets:" && $(i + 1) > 0) found = 1 }
       END { exit !found }' "$1"
}

sink_read() { # "time arrived read dropped": datagrams that arrived at the loopback sink's
  # socket (read by the sink + dropped on its full buffer), and when the sink counted them
  cat "$work/sink.count" 2>/dev/null || echo "0 0 0 0"
}

udp_rcvbuf_errors() { # UDP datagrams dropped on a full receive buffer, all sockets (the relay's too)
  awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) k[i] = $i; h = 1 } else for (i = 1; i <= NF; i++) if (k[i] == "RcvbufErrors") print $i }' /proc/net/snmp
}

moat_counter() { # moat_counter GROUP.NAME: one of moat's counters through its control socket
  "$moat" stats --control "$ctl" --json | python3 -c '
import json, sys
print(json.load(sys.stdin)["counters"].get(sys.argv[1], 0))' "$1"
}

moat_frames() { # moat's traffic.tx_frames through its control socket
  "$moat" stats --control "$ctl" --json | grep -o '"traffic.tx_frames": *[0-9]*' | grep -o '[0-9]*$'
}

# The txonly frontend. Extra testpmd options (addresses) in the remaining arguments.
start_tx() { # start_tx NAME SOCKET SIZE [testpmd options...]
  local name=$1 sock=$2 size=$3
  shift 3
  taskset -c 1 dpdk-testpmd --no-huge -m 1024 --no-shconf --file-prefix "moat-pps-tx-$$-$name" \
    --lcores '0@1,1@1' --no-pci \
    --vdev "net_virtio_user0,path=$sock,mac=52:54:00:12:34:56" \
    -- --forward-mode=txonly --total-num-mbufs=16384 --stats-period 1 --txpkts="$size" "$@" \
    </dev/null > >(stamp >"$work/$name.tx") 2>"$work/$name.tx.err" &
  tx_pid=$!
  pids+=("$tx_pid")
}

# The answer cases' frontend: real DNS queries replayed from a pcap (port 0, net_pcap,
# infinite_rx; what it is given to send is dropped) into the virtio-user port (port 1) in io
# mode, which also reads port 1's RX ring: the answers are read and counted by the guest.
start_tx_pcap() { # start_tx_pcap NAME SOCKET SIZE
  local name=$1 sock=$2 size=$3
  [ -f "$work/dns-$size.pcap" ] || python3 scripts/dns-pcap.py "$size" "$work/dns-$size.pcap" 256
  taskset -c 1 dpdk-testpmd --no-huge -m 1024 --no-shconf --file-prefix "moat-pps-tx-$$-$name" \
    --lcores '0@1,1@1' --no-pci \
    --vdev "net_pcap0,rx_pcap=$work/dns-$size.pcap,infinite_rx=1" \
    --vdev "net_virtio_user0,path=$sock,mac=52:54:00:12:34:56" \
    -- --forward-mode=io --total-num-mbufs=16384 --stats-period 1 \
    </dev/null > >(stamp >"$work/$name.tx") 2>"$work/$name.tx.err" &
  tx_pid=$!
  pids+=("$tx_pid")
}

stop() { # stop PID SIGNAL: signal and wait (up to 20 s)
  kill -"$2" "$1" 2>/dev/null || return 0
  local i
  for i in $(seq 200); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

results=()
notes=()

# One measurement. The receiver is already up (pid $rx_pid); measure() starts the sender,
# waits for it to send, then counts for $secs seconds.
measure() { # measure CASE SIZE KIND(moat|vhost|passt|sink|answer) [testpmd options...]
  local case=$1 size=$2 kind=$3
  shift 3
  local name="$case-$size"
  if ! kill -0 "$rx_pid" 2>/dev/null; then
    echo "bench-pps: $name: the receiver is not running" >&2
    results+=("$case $size - - - failed")
    return
  fi
  if [ "$kind" = answer ]; then
    start_tx_pcap "$name" "$sock" "$size"
  else
    start_tx "$name" "$sock" "$size" "$@"
  fi
  if ! wait_for 90 sending "$work/$name.tx"; then
    echo "bench-pps: $name: testpmd sent nothing" >&2
    sed -n '1,40p' "$work/$name.tx.err" >&2 || true
    stop "$tx_pid" INT
    results+=("$case $size - - - failed")
    return
  fi
  sleep 1 # ramp up
  local c0 c1 t0 t1 cpu0 cpu1 n1 n w extra=""
  case $kind in
    moat)
      # moat's TX frames, read between two stamps, each read stamped at the middle of its
      # round trip.
      local a b
      a=$(now); c0=$(moat_frames); b=$(now); cpu0=$(cpu_ns "$rx_pid")
      t0=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.6f", (a + b) / 2}')
      sleep "$secs"
      a=$(now); c1=$(moat_frames); b=$(now); cpu1=$(cpu_ns "$rx_pid")
      t1=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.6f", (a + b) / 2}')
      ;;
    sink)
      # Datagrams that arrived at the loopback sink, with the sink's own time of counting
      # (it rewrites "time arrived read dropped" about every 0.2 s): the same point for moat (through the
      # SOCKS5 relay) and passt. "Arrived" includes what the sink's socket dropped on a
      # full buffer (the sink may be starved of CPU): both are logged. Also the relay's CPU
      # (dante, if any: $relay_pid).
      local r0=0 r1=0 rd0 rd1 d0 d1 u0
      cpu0=$(cpu_ns "$rx_pid"); u0=$(udp_rcvbuf_errors)
      [ -n "${relay_pid:-}" ] && r0=$(relay_cpu_ns)
      read -r t0 c0 rd0 d0 < <(sink_read)
      sleep "$secs"
      read -r t1 c1 rd1 d1 < <(sink_read)
      cpu1=$(cpu_ns "$rx_pid")
      [ -n "${relay_pid:-}" ] && r1=$(relay_cpu_ns)
      extra="relay_cpu_s=$(awk -v a="$r0" -v b="$r1" 'BEGIN {printf "%.2f", (b - a) / 1e9}') sink_read=$((rd1 - rd0)) sink_socket_dropped=$((d1 - d0)) udp_rcvbuf_errors_all_sockets=$(($(udp_rcvbuf_errors) - u0))"
      ;;
    answer)
      # Answers the guest read from its RX ring: the frontend's virtio-user port (1)
      # RX-packets within the window, over the periods testpmd measured. For moat, also the
      # answers it built but had no RX buffer for (the guest offers more than it reads).
      local q0=0 q1=0
      [ "${case#moat}" != "$case" ] && q0=$(moat_counter drop.rx_queue_full)
      t0=$(now); cpu0=$(cpu_ns "$rx_pid")
      sleep "$secs"
      t1=$(now); cpu1=$(cpu_ns "$rx_pid")
      [ "${case#moat}" != "$case" ] && q1=$(moat_counter drop.rx_queue_full)
      sleep 1.2 # the statistics printed within the window, first and last
      read -r n w < <(pmd_window "$work/$name.tx" RX-packets: Rx-pps: "$t0" "$t1" 1) || true
      c0=0 c1=$n
      extra="answers_dropped_rx_full=$((q1 - q0)) over_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')"
      [ "${case#moat}" != "$case" ] && notes+=("$case $size: $((q1 - q0)) answers built but dropped for want of an RX buffer in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s (not counted)")
      t0=0 t1=$w
      ;;
    vhost|passt)
      # The vhost PMD counts what it received; passt has no counter, so what testpmd got
      # into the ring (and passt consumed) stands for it.
      local log=$work/$case-$size.rx key=RX-packets: pps=Rx-pps:
      [ "$kind" = passt ] && log=$work/$name.tx key=TX-packets: pps=Tx-pps:
      t0=$(now); cpu0=$(cpu_ns "$rx_pid")
      sleep "$secs"
      t1=$(now); cpu1=$(cpu_ns "$rx_pid")
      sleep 1.2 # the statistics printed within the window, first and last
      read -r n w < <(pmd_window "$log" "$key" "$pps" "$t0" "$t1") || true
      c0=0 c1=$n t0=0 t1=$w
      ;;
  esac
  # What the sender offered over the same time, for reference.
  read -r _ n1 < <(stat_at "$work/$name.tx" TX-packets: "$(now)") || n1=0
  stop "$tx_pid" INT
  if [ -z "${c0:-}" ] || [ -z "${c1:-}" ] || [ "$c0" = null ] || [ -z "${t0:-}" ] ||
    ! awk -v a="$t0" -v b="$t1" 'BEGIN { exit !(b - a > 0.5) }'; then
    echo "bench-pps: $name: no receiver counters" >&2
    results+=("$case $size - - - failed")
    return
  fi
  local mpps cpu wall
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
  mpps=$(awk -v a="$c0" -v b="$c1" -v w="$wall" 'BEGIN {printf "%.3f", (b - a) / w / 1e6}')
  cpu=$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN {printf "%.2f", (b - a) / 1e9}')
  results+=("$case $size $mpps $cpu $wall ok")
  printf '%s case=%s size=%s frames=%s wall_s=%s mpps=%s rx_cpu_s=%s tx_sent_total=%s %s\n' \
    "$(date -u +%FT%TZ)" "$case" "$size" "$((c1 - c0))" "$wall" "$mpps" "$cpu" "${n1:-0}" "$extra" >>"$raw"
}

start_moat() { # start_moat FRAME_SIZE [moat serve options...]: deny-all.toml
  local size=$1 policy=policy/deny-all.toml
  shift
  if [ "$size" -gt 1514 ]; then
    # deny-all has mtu 1500 (frames up to 1514 B): larger frames would be dropped as
    # oversized before parsing. Same policy with an MTU that admits them.
    policy="$work/deny-all-mtu.toml"
    sed "s/^\[vm\]\$/[vm]\nmtu = $((size - 14))/" policy/deny-all.toml >"$policy"
  fi
  start_moat_policy "$policy" "$@"
}

start_moat_policy() { # start_moat_policy FILE [moat serve options...]
  sock="$work/moat.sock"
  ctl="$work/moat.ctl"
  rm -f "$sock" "$ctl"
  local policy=$1
  shift
  MOAT_LOG=warn taskset -c 0 "$moat" serve --socket "$sock" --policy "$policy" \
    --control "$ctl" "$@" </dev/null >/dev/null 2>>"$work/moat.log" &
  rx_pid=$!
  pids+=("$rx_pid")
  wait_for 10 test -S "$sock" && wait_for 10 test -S "$ctl"
}

start_vhost() { # start_vhost NAME [FORWARD_MODE]
  sock="$work/vhost.sock"
  rm -f "$sock"
  taskset -c 0 dpdk-testpmd --no-huge -m 1024 --no-shconf --file-prefix "moat-pps-rx-$$-$1" \
    --lcores '0@0,1@0' --no-pci --vdev "net_vhost0,iface=$sock,queues=1" \
    -- --forward-mode="${2:-rxonly}" --total-num-mbufs=16384 --stats-period 1 \
    </dev/null > >(stamp >"$work/$1.rx") 2>"$work/$1.rx.err" &
  rx_pid=$!
  pids+=("$rx_pid")
  wait_for 90 test -S "$sock" || {
    echo "bench-pps: the vhost PMD did not create its socket" >&2
    cat "$work/$1.rx.err" >&2
    return 1
  }
}

echo "# $(date -u +%FT%TZ) bench-pps secs=$secs sizes=\"$sizes\" $(nproc) CPUs, dpdk $(dpkg-query -W -f '${Version}' dpdk-dev 2>/dev/null || echo unknown)" >>"$raw"
gw_mac=02:6d:6f:61:74:01
for size in $sizes; do
  echo "bench-pps: ${size} B frames, ${secs} s each ..." >&2
  if start_vhost "ceiling-$size"; then
    measure ceiling "$size" vhost
  else
    results+=("ceiling $size - - - failed")
  fi
  stop "$rx_pid" INT
  # The answer path's peer: the vhost PMD swapping MACs and sending every query back into
  # the frontend's RX ring, fed and counted by the same pcap-replaying, RX-reading frontend.
  if start_vhost "ceiling-macswap-$size" macswap; then
    measure ceiling-macswap "$size" answer
  else
    results+=("ceiling-macswap $size - - - failed")
  fi
  stop "$rx_pid" INT

  if start_moat "$size"; then
    measure moat-drop "$size" moat
    measure moat-drop-ip "$size" moat --eth-peer=0,$gw_mac --tx-ip=10.0.0.2,10.0.0.1 --tx-udp=40000,9
    measure moat-answer "$size" answer
  else
    echo "bench-pps: moat did not start:" >&2
    cat "$work/moat.log" >&2
    results+=("moat-drop $size - - - failed" "moat-drop-ip $size - - - failed" "moat-answer $size - - - failed")
  fi
  stop "$rx_pid" TERM
  # The same cases with busy polling: moat looks for more TX buffers for 50 us before it
  # sleeps, so a sending guest never needs to kick it.
  if start_moat "$size" --busy-poll-us 50; then
    measure moat-drop-poll "$size" moat
    measure moat-answer-poll "$size" answer
  else
    results+=("moat-drop-poll $size - - - failed" "moat-answer-poll $size - - - failed")
  fi
  stop "$rx_pid" TERM
  { echo "## moat counters after the ${size} B cases"; cat "$work/moat.log"; } >>"$raw"
  cp "$work/moat.log" "$work/moat-$size.log"
  : >"$work/moat.log"

  if [ -n "${PASST:-}" ]; then
    sock="$work/passt.sock"
    rm -f "$sock"
    taskset -c 0 "$PASST" --vhost-user --socket "$sock" -f </dev/null >"$work/passt.log" 2>&1 &
    rx_pid=$!
    pids+=("$rx_pid")
    if wait_for 10 test -S "$sock"; then
      measure passt "$size" passt
    else
      echo "bench-pps: passt did not create $sock" >&2
      results+=("passt $size - - - failed")
    fi
    stop "$rx_pid" TERM
  fi
done

# UDP forwarded to the proxy side, 64 B frames (22 B of payload): moat relays each
# datagram through a SOCKS5 UDP association (dante on loopback) to a sink on loopback;
# passt sends each to the sink itself (its gateway mapped to the host's loopback). Both
# from the same testpmd txonly stream, both counted where they arrive: datagrams the same
# sink received (scripts/udp-sink.py), per second and per CPU-second of the backend (moat,
# or passt). dante's CPU is not in moat's figure; it is logged apart in pps.txt
# (relay_cpu_s). "Arrived" = read by the sink + dropped by its socket on a full buffer (the
# sink is a Python loop and may be starved); both parts are logged in pps.txt.
udp_port=9999
if command -v danted >/dev/null && command -v python3 >/dev/null; then
  echo "bench-pps: UDP to the proxy side, 64 B frames, ${secs} s each ..." >&2
  python3 scripts/udp-sink.py "$udp_port" "$work/sink.count" &
  pids+=("$!")
  dante_port=$((20000 + RANDOM % 20000))
  printf '%s\n' "logoutput: $work/danted.log" "internal: 127.0.0.1 port = $dante_port" \
    "external: 127.0.0.1" "socksmethod: none" "clientmethod: none" "user.privileged: root" \
    "user.unprivileged: nobody" "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }" \
    "socks pass { from: 127.0.0.0/8 to: 127.0.0.0/8 command: udpassociate udpreply }" \
    "socks block { from: 0.0.0.0/0 to: 0.0.0.0/0 }" >"$work/danted.conf"
  # dante shares moat's CPU: CPU 1 is the busy-polling testpmd's, where the relay starved.
  taskset -c 0 danted -f "$work/danted.conf" -p "$work/danted.pid" >/dev/null 2>&1 &
  pids+=("$!")
  relay_cpu_ns() { # dante's CPU: its main process and the children it forked (live ones)
    local p total=0
    for p in "$relay_pid" $(pgrep -P "$relay_pid" 2>/dev/null || true); do
      total=$((total + $(cpu_ns "$p")))
    done
    echo "$total"
  }
  cp policy/deny-all.toml "$work/udp.toml"
  printf '\n[proxy]\nsocks5 = "127.0.0.1:%s"\n[[outbound]]\nprotocol = "udp"\nports = [%s]\nto = ["127.0.0.1/32"]\n' \
    "$dante_port" "$udp_port" >>"$work/udp.toml"
  if wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$dante_port" 2>/dev/null &&
    start_moat_policy "$work/udp.toml"; then
    relay_pid=$(cat "$work/danted.pid" 2>/dev/null || true)
    measure moat-udp 64 sink --eth-peer=0,$gw_mac --tx-ip=10.0.0.2,127.0.0.1 --tx-udp=40000,$udp_port
    relay_pid=""
  else
    echo "bench-pps: moat or dante did not start for the UDP case" >&2
    results+=("moat-udp 64 - - - failed")
  fi
  stop "$rx_pid" TERM
  if [ -n "${PASST:-}" ]; then
    sock="$work/passt.sock"
    rm -f "$sock"
    taskset -c 0 "$PASST" --vhost-user -f -q -s "$sock" -a 10.0.0.2 -n 24 -g 10.0.0.1 \
      --map-host-loopback 10.0.0.1 -t none -u none </dev/null >"$work/passt-udp.log" 2>&1 &
    rx_pid=$!
    pids+=("$rx_pid")
    if wait_for 10 test -S "$sock"; then
      # passt answers ARP as 9a:55:9a:55:9a:55 (its default MAC).
      measure passt-udp 64 sink --eth-peer=0,9a:55:9a:55:9a:55 --tx-ip=10.0.0.2,10.0.0.1 --tx-udp=40000,$udp_port
    else
      results+=("passt-udp 64 - - - failed")
    fi
    stop "$rx_pid" TERM
  fi
else
  echo "bench-pps: UDP cases skipped (danted or python3 missing)" >&2
fi

[ -n "${PASST:-}" ] || echo "bench-pps: passt skipped (set PASST=/path/to/passt, a passt with --vhost-user, to measure it)" >&2

# The table: every case against its peer at the same frame size: the vhost PMD in rxonly
# mode (ceiling) for receiving and dropping, in macswap mode (ceiling-macswap) for the
# answer cases. Mpps/CPU-s is frames per second of the receiver's own CPU time: on a shared
# machine a starved receiver (less than a whole core) shows a lower Mpps but the same
# Mpps/CPU-s, so that ratio is the steadier one.
{
  printf '%-17s %6s %9s %9s %8s %10s %-16s %11s %11s\n' case bytes Mpps "CPU s" "wall s" "Mpps/CPU-s" peer "ratio" "ratio/CPU-s"
  for r in "${results[@]}"; do
    read -r c s m cpu w st <<<"$r"
    peer=ceiling
    case $c in *answer*) peer=ceiling-macswap ;; ceiling* | passt-udp) peer=- ;; moat-udp) peer=passt-udp ;; esac
    ceil=$(printf '%s\n' "${results[@]}" | awk -v s="$s" -v p="$peer" '$1 == p && $2 == s && $6 == "ok" {print $3, $4, $5}')
    read -r cm ccpu cw <<<"${ceil:-0 0 0}"
    percpu=$(awk -v m="$m" -v c="$cpu" -v w="$w" 'BEGIN { if (m != "-" && c > 0) printf "%.3f", m * w / c; else print "-" }')
    cpercpu=$(awk -v m="$cm" -v c="$ccpu" -v w="$cw" 'BEGIN { if (c > 0) printf "%.3f", m * w / c; else print 0 }')
    ratio=$(awk -v m="$m" -v c="$cm" 'BEGIN { if (c > 0 && m != "-") printf "%.3f", m / c; else print "-" }')
    ratio_cpu=$(awk -v m="$percpu" -v c="$cpercpu" 'BEGIN { if (c > 0 && m != "-") printf "%.3f", m / c; else print "-" }')
    printf '%-17s %6s %9s %9s %8s %10s %-16s %11s %11s\n' "$c" "$s" "$m" "$cpu" "$w" "$percpu" "$peer" "$ratio" "$ratio_cpu"
  done
} | tee "$work/table"
echo "(1518 B moat cases: deny-all.toml + mtu = 1504, else they would be dropped as oversized unparsed)"
echo "(Mpps from the receiver's counters; CPU s = receiver CPU over the window; the vhost PMD polls, so its CPU is its whole window)"
echo "(answer cases: real DNS queries replayed from a pcap, Mpps = answers the guest read from its RX ring (frontend's virtio-user RX-packets), for moat and for the PMD's macswap alike; not ICMP: testpmd cannot send it)"
echo "(moat-udp, passt-udp: Mpps = datagrams that arrived at the same loopback sink; CPU s = the backend's (moat, or passt), dante's apart in pps.txt)"
for n in "${notes[@]}"; do echo "note: $n"; done
for size in $sizes; do
  [ -f "$work/moat-$size.log" ] || continue
  echo "moat drop reasons, ${size} B cases:"
  grep -E '^drop|^answered|^traffic' "$work/moat-$size.log" | sed 's/^/  /' || true
done
{ echo "## table"; cat "$work/table"; } >>"$raw"
