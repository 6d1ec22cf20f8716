#!/usr/bin/env bash
# Boot a real Linux guest (QEMU, TCG) behind `moat serve` and check from inside it that it
# gets its address by DHCP, reaches its gateway, and reaches nothing else.
# Usage: scripts/qemu-e2e.sh --moat BIN --policy FILE [--workdir DIR] [--guest-dir DIR]
#                            [--egress-port PORT --forward ADDR:PORT] [--queues N]
#                            [--dns-flood BYTES]
# Prints a table (check | expected | observed | verdict), then moat's counters; exit 0 iff
# every check matched its expectation, the guest printed MOAT-DONE and moat stayed up and
# stopped cleanly. Logs (serial.log, moat.log, qemu.log) stay in --workdir; a temporary
# workdir is removed on success. MOAT_E2E_TIMEOUT (seconds, default 150) bounds the guest.
# The guest talks only to moat: its one NIC is the vhost-user socket, and no QEMU
# user-mode networking, TAP or bridge is involved.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
moat="" policy="" workdir="" guest_dir="$repo/target/guest" boot_timeout=${MOAT_E2E_TIMEOUT:-150}
egress_port="" forward="" queues=1 dns_flood=""
usage="usage: qemu-e2e.sh --moat BIN --policy FILE [--workdir DIR] [--guest-dir DIR] [--egress-port PORT --forward ADDR:PORT] [--queues N] [--dns-flood BYTES]"
while [ $# -gt 0 ]; do
  case "$1" in
    --moat) moat=${2:?$usage}; shift 2 ;;
    --policy) policy=${2:?$usage}; shift 2 ;;
    --workdir) workdir=${2:?$usage}; shift 2 ;;
    --guest-dir) guest_dir=${2:?$usage}; shift 2 ;;
    --egress-port) egress_port=${2:?$usage}; shift 2 ;; # origin port for the guest's egress checks
    --kill-moat) kill_moat=1; shift ;;                  # SIGKILL moat mid-run, restart it, expect the network back
    --forward) forward=${2:?$usage}; shift 2 ;;         # host addr:port of a [[forward]] to fetch from
    --queues) queues=${2:?$usage}; shift 2 ;;           # queue pairs (moat --queues, QEMU mq=on, N vCPUs)
    --dns-flood) dns_flood=${2:?$usage}; shift 2 ;;     # guest pipelines this many bytes of DNS-over-TCP queries, never reading; moat's RSS is watched
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "qemu-e2e: unknown argument $1" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
[ -x "$moat" ] && [ -f "$policy" ] || { echo "$usage" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-e2e: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2; exit 1; }

"$here/build-guest.sh" "$guest_dir" >/dev/null
own_workdir=""
[ -n "$workdir" ] || { workdir=$(mktemp -d "${TMPDIR:-/tmp}/moat-e2e.XXXXXX"); own_workdir=1; }
mkdir -p "$workdir"
sock="$workdir/moat.sock" serial="$workdir/serial.log" moat_log="$workdir/moat.log"
rm -f "$sock" "$serial" "$moat_log" "$workdir/qemu.log" "$workdir/forward.txt"

# What the guest must see, from the policy.
mac=$(sed -n 's/^[[:space:]]*mac[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$policy" | head -n 1)
address=$(sed -n 's/^[[:space:]]*address[[:space:]]*=[[:space:]]*"\([^"/]*\)\/.*/\1/p' "$policy" | head -n 1)
gateway=$(sed -n 's/^[[:space:]]*gateway[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$policy" | head -n 1)
[ -n "$mac" ] && [ -n "$address" ] || { echo "qemu-e2e: no [vm] mac/address in $policy" >&2; exit 2; }
if [ -z "$gateway" ]; then # a /30's other host address
  last=${address##*.}; base=${address%.*}
  net=$(( last & ~3 )); gateway="$base.$(( last == net + 1 ? net + 2 : net + 1 ))"
fi

moat_pid="" qemu_pid="" fetch_pid="" killer_pid="" rss_pid=""
cleanup() {
  for p in $qemu_pid $fetch_pid $killer_pid $rss_pid $moat_pid $(cat "$workdir/moat2.pid" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

"$moat" serve --socket "$sock" --policy "$policy" --queues "$queues" >"$moat_log" 2>&1 &
moat_pid=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; kill -0 "$moat_pid" 2>/dev/null || break; sleep 0.05; done
[ -S "$sock" ] || { echo "qemu-e2e: moat did not create $sock"; cat "$moat_log"; exit 1; }

start=$(date +%s)
# vectors=0: with MSI-X QEMU 7.2 under TCG crashes when vhost-user starts. romfile=: no iPXE.
# share=on guest RAM: without it the link comes up but no frame ever flows.
# With --queues N: N vCPUs, so Linux's virtio-net uses all N pairs (one per CPU).
mq=""
[ "$queues" = 1 ] || mq=",mq=on"
timeout -k 5 "$boot_timeout" qemu-system-x86_64 \
  -machine q35,accel=tcg -cpu max -smp "$queues" -m 256 \
  -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
  -chardev socket,id=net0,path="$sock"${kill_moat:+,reconnect=1} \
  -netdev vhost-user,id=net0,chardev=net0,queues="$queues" \
  -device virtio-net-pci,netdev=net0,mac="$mac",vectors=0,romfile=$mq \
  -kernel "$guest_dir/vmlinux" -initrd "$guest_dir/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet panic=-1 moat.expect_ip=$address moat.gateway=$gateway${egress_port:+ moat.egress=$egress_port}${kill_moat:+ moat.run=/bin/restart.sh}${dns_flood:+ moat.dnsflood=$dns_flood}" \
  -display none -serial "file:$serial" -monitor none -nodefaults -no-user-config -no-reboot \
  >"$workdir/qemu.log" 2>&1 </dev/null &
qemu_pid=$!
if [ -n "$dns_flood" ]; then
  # moat's resident memory (kB) when the guest starts its DNS-over-TCP flood, and the most
  # it reaches from then on.
  (
    base="" peak=0
    while kill -0 "$qemu_pid" 2>/dev/null; do
      rss=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$moat_pid/status" 2>/dev/null || true)
      if [ -n "$rss" ]; then
        if [ -z "$base" ] && grep -q MOAT-DNSFLOOD-START "$serial" 2>/dev/null; then base=$rss; fi
        if [ -n "$base" ] && [ "$rss" -gt "$peak" ]; then peak=$rss; fi
        echo "${base:-0} $peak" >"$workdir/rss.txt"
      fi
      sleep 0.2
    done
  ) &
  rss_pid=$!
fi
if [ -n "$forward" ]; then
  # When the guest's httpd is up, fetch its page from the host through the forward
  # (loopback only; proxies from the environment are ignored).
  (
    for _ in $(seq 600); do grep -q MOAT-HTTPD-UP "$serial" 2>/dev/null && break; sleep 0.2; done
    env -u http_proxy -u HTTP_PROXY -u all_proxy -u ALL_PROXY \
      timeout 15 busybox wget -Y off -q -O - "http://$forward/" >"$workdir/forward.txt" 2>&1 || true
  ) &
  fetch_pid=$!
fi
if [ -n "${kill_moat:-}" ]; then
  # When the guest is up, SIGKILL moat, then start a new one on the same socket.
  (
    for _ in $(seq 1200); do grep -q MOAT-READY-FOR-KILL "$serial" 2>/dev/null && break; sleep 0.1; done
    kill -KILL "$moat_pid" 2>/dev/null
    sleep 1
    "$moat" serve --socket "$sock" --policy "$policy" --queues "$queues" >>"$moat_log" 2>&1 &
    echo $! >"$workdir/moat2.pid"
  ) &
  killer_pid=$!
fi
qemu_status=0
wait "$qemu_pid" || qemu_status=$?
if [ -n "$killer_pid" ]; then
  wait "$killer_pid" 2>/dev/null || true
  killer_pid=""
  wait "$moat_pid" 2>/dev/null || true  # the killed one
  moat_pid=$(cat "$workdir/moat2.pid" 2>/dev/null)
fi
qemu_pid=""
[ -n "$rss_pid" ] && { wait "$rss_pid" 2>/dev/null || true; rss_pid=""; }
elapsed=$(( $(date +%s) - start ))
[ -n "$fetch_pid" ] && { wait "$fetch_pid" 2>/dev/null || true; fetch_pid=""; }

# moat must have survived the whole run, and must stop cleanly on SIGTERM.
moat_problem=""
if ! kill -0 "$moat_pid" 2>/dev/null; then
  moat_status=0; wait "$moat_pid" || moat_status=$?
  moat_problem="moat exited during the run (status $moat_status)"
else
  kill -TERM "$moat_pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$moat_pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$moat_pid" 2>/dev/null; then
    kill -KILL "$moat_pid" 2>/dev/null || true
    moat_problem="moat did not stop within 5 s of SIGTERM"
  fi
  # The restarted moat (--kill-moat) is not this shell's child: its status is not ours to read.
  moat_status=0
  [ -n "${kill_moat:-}" ] || { wait "$moat_pid" || moat_status=$?; }
  [ -n "$moat_problem" ] || [ "$moat_status" = 0 ] || moat_problem="moat exited with status $moat_status on SIGTERM"
fi
moat_pid=""

tr -d '\r' <"$serial" >"$serial.txt" 2>/dev/null || : >"$serial.txt"
fail=0
printf '%-20s %-9s %-9s %s\n' check expected observed verdict
while read -r _ name expected observed detail; do
  want=$([ "$expected" = pass ] && echo ok || echo blocked)
  if [ "$observed" = "$want" ]; then
    printf '%-20s %-9s %-9s %s\n' "$name" "$expected" "$observed" PASS
  else
    printf '%-20s %-9s %-9s %s  (%s)\n' "$name" "$expected" "$observed" FAIL "$detail"
    fail=1
  fi
done < <(grep '^MOAT-CHECK ' "$serial.txt")
if [ -n "$forward" ]; then
  if [ "$(cat "$workdir/forward.txt" 2>/dev/null)" = guest-page ]; then observed=ok verdict=PASS; else observed=blocked verdict=FAIL fail=1; fi
  printf '%-20s %-9s %-9s %s\n' host-fetch-forward pass "$observed" "$verdict"
fi
checks=$(grep -c '^MOAT-CHECK ' "$serial.txt" || true)
stamp() { sed -n "s/^$1 \([0-9.]*\).*/\1/p" "$serial.txt" | head -n 1; }
boot=$(stamp MOAT-BOOT) begin=$(stamp MOAT-CHECKS-START) done_at=$(stamp MOAT-DONE)
echo "guest ran ${checks} checks in ${elapsed}s wall (qemu exit $qemu_status; guest clock: /init at ${boot:-?}s, checks from ${begin:-?}s to ${done_at:-?}s)"
[ "$checks" -gt 0 ] || { echo "qemu-e2e: no MOAT-CHECK lines on the serial console"; fail=1; }
if ! grep -q '^MOAT-DONE' "$serial.txt"; then
  echo "qemu-e2e: the guest did not finish (no MOAT-DONE within ${boot_timeout}s)"
  fail=1
fi
if [ -n "$moat_problem" ]; then
  echo "qemu-e2e: $moat_problem"
  fail=1
fi
if [ "$fail" != 0 ]; then
  echo "--- serial (tail, $serial) ---"; tail -n 40 "$serial.txt"
  echo "--- qemu ($workdir/qemu.log) ---"; tail -n 20 "$workdir/qemu.log"
  echo "--- moat (tail, $moat_log) ---"; tail -n 60 "$moat_log"
  exit 1
fi
if [ -n "$dns_flood" ]; then
  read -r rss_base rss_peak <"$workdir/rss.txt" 2>/dev/null || rss_base=0 rss_peak=0
  echo "dns-flood: $(sed -n 's/^MOAT-DNSFLOOD \(sent=.*\)/\1/p' "$serial.txt" | head -n 1)"
  echo "moat-rss-kb baseline=${rss_base:-0} peak=${rss_peak:-0}"
fi
echo "--- moat counters ---"
sed -n '/^group /,$p' "$moat_log"
[ -z "$own_workdir" ] || rm -rf "$workdir"
