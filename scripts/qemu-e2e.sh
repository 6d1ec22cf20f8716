#!/usr/bin/env bash
# Boot a real Linux guest (QEMU, TCG) behind `moat serve` and check from inside it that it
# gets its address by DHCP, reaches its gateway, and reaches nothing else.
# Usage: scripts/qemu-e2e.sh --moat BIN --policy FILE [--workdir DIR] [--guest-dir DIR]
# Prints a table (check | expected | observed | verdict); exit 0 iff every check matched.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
moat="" policy="" workdir="" guest_dir="$repo/target/guest" boot_timeout=${MOAT_E2E_TIMEOUT:-150}
egress_port="" forward=""
while [ $# -gt 0 ]; do
  case "$1" in
    --moat) moat=$2; shift 2 ;;
    --policy) policy=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --guest-dir) guest_dir=$2; shift 2 ;;
    --egress-port) egress_port=$2; shift 2 ;;   # origin port for the guest's egress checks
    --forward) forward=$2; shift 2 ;;           # host addr:port of a [[forward]] to fetch from

    *) echo "qemu-e2e: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$moat" ] && [ -f "$policy" ] || { echo "usage: qemu-e2e.sh --moat BIN --policy FILE [--workdir DIR] [--egress-port PORT --forward ADDR:PORT]" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-e2e: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2; exit 1; }

"$here/build-guest.sh" "$guest_dir" >/dev/null
[ -n "$workdir" ] || workdir=$(mktemp -d)
mkdir -p "$workdir"
sock="$workdir/moat.sock" serial="$workdir/serial.log" moat_log="$workdir/moat.log"

# What the guest must see, from the policy.
mac=$(sed -n 's/^mac *= *"\([^"]*\)".*/\1/p' "$policy" | head -n 1)
address=$(sed -n 's/^address *= *"\([^"/]*\)\/.*/\1/p' "$policy" | head -n 1)
gateway=$(sed -n 's/^gateway *= *"\([^"]*\)".*/\1/p' "$policy" | head -n 1)
if [ -z "$gateway" ]; then # a /30's other host address
  last=${address##*.}; base=${address%.*}
  net=$(( last & ~3 )); gateway="$base.$(( last == net + 1 ? net + 2 : net + 1 ))"
fi

moat_pid="" qemu_pid=""
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
  [ -n "$moat_pid" ] && kill "$moat_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$moat" serve --socket "$sock" --policy "$policy" >"$moat_log" 2>&1 &
moat_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "qemu-e2e: moat did not create $sock"; cat "$moat_log"; exit 1; }

start=$(date +%s)
timeout "$boot_timeout" qemu-system-x86_64 \
  -machine q35,accel=tcg -cpu max -smp 1 -m 256 \
  -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
  -chardev socket,id=net0,path="$sock" \
  -netdev vhost-user,id=net0,chardev=net0 \
  -device virtio-net-pci,netdev=net0,mac="$mac",vectors=0,romfile= \
  -kernel "$guest_dir/vmlinux" -initrd "$guest_dir/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet panic=-1 moat.expect_ip=$address moat.gateway=$gateway${egress_port:+ moat.egress=$egress_port}" \
  -display none -serial "file:$serial" -monitor none -no-reboot \
  >"$workdir/qemu.log" 2>&1 &
qemu_pid=$!
fetch_pid=""
if [ -n "$forward" ]; then
  # When the guest's httpd is up, fetch its page from the host through the forward.
  (
    for _ in $(seq 600); do grep -q MOAT-HTTPD-UP "$serial" 2>/dev/null && break; sleep 0.2; done
    python3 - "$forward" >"$workdir/forward.txt" 2>&1 <<'PY'
import sys, urllib.request
body = urllib.request.urlopen("http://" + sys.argv[1] + "/", timeout=10).read().decode().strip()
print(body)
PY
  ) &
  fetch_pid=$!
fi
qemu_status=0
wait "$qemu_pid" || qemu_status=$?
qemu_pid=""
elapsed=$(( $(date +%s) - start ))

kill -TERM "$moat_pid" 2>/dev/null || true
wait "$moat_pid" 2>/dev/null || true
moat_pid=""

tr -d '\r' <"$serial" >"$serial.txt" 2>/dev/null || : >"$serial.txt"
fail=0
printf '%-18s %-9s %-9s %s\n' check expected observed verdict
while read -r _ name expected observed detail; do
  want=$([ "$expected" = pass ] && echo ok || echo blocked)
  if [ "$observed" = "$want" ]; then verdict=PASS; else verdict=FAIL; fail=1; fi
  printf '%-18s %-9s %-9s %s\n' "$name" "$expected" "$observed" "$verdict"
done < <(grep '^MOAT-CHECK ' "$serial.txt")
if [ -n "$forward" ]; then
  [ -n "$fetch_pid" ] && wait "$fetch_pid" 2>/dev/null || true
  if [ "$(cat "$workdir/forward.txt" 2>/dev/null)" = guest-page ]; then observed=ok verdict=PASS; else observed=blocked verdict=FAIL fail=1; fi
  printf '%-18s %-9s %-9s %s\n' host-fetch-forward pass "$observed" "$verdict"
fi
checks=$(grep -c '^MOAT-CHECK ' "$serial.txt" || true)
echo "guest ran ${checks} checks in ${elapsed}s (qemu exit $qemu_status)"
if ! grep -q '^MOAT-DONE' "$serial.txt"; then
  echo "qemu-e2e: the guest did not finish (no MOAT-DONE within ${boot_timeout}s)"
  fail=1
fi
if [ "$fail" != 0 ]; then
  echo "--- serial (tail) ---"; tail -n 40 "$serial.txt"
  echo "--- qemu ---"; tail -n 20 "$workdir/qemu.log"
  echo "--- moat (tail) ---"; tail -n 40 "$moat_log"
  exit 1
fi
echo "--- moat counters ---"
sed -n '/^group /,$p' "$moat_log"
