#!/usr/bin/env bash
# The canary VM: boot the small test guest (scripts/build-guest.sh) under QEMU (TCG) behind
# a fresh `moat serve` with POLICY, run scripts/canary-guest.sh inside it (a real kernel
# making the forbidden attempts: other VMs, host ports, metadata, other resolvers, spoofing,
# IPv6), and print the same JSON events as `moat canary --live --json`: one `alert` object
# per attempt that went the wrong way (P1: a forbidden attempt got through; P2: a control
# failed, an attempt never left the guest, or the canary was aborted), then a `round`
# summary. Exit 0 all passed, 1 otherwise, 2 bad usage or bad policy.
# Usage: scripts/canary-vm.sh [--moat BIN] [--guest-dir DIR] [--workdir DIR] POLICY
#   --serial FILE   judge an existing serial log instead of booting (for tests)
# MOAT_CANARY_VM_TIMEOUT (seconds, default 240) bounds the guest. The guest's only NIC is
# the vhost-user socket; no user-mode networking, TAP or bridge.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
moat=$(command -v moat || echo "$repo/target/debug/moat")
guest_dir="$repo/target/guest" workdir="" serial_in="" policy=""
timeout_s=${MOAT_CANARY_VM_TIMEOUT:-240}
usage="usage: canary-vm.sh [--moat BIN] [--guest-dir DIR] [--workdir DIR] [--serial FILE] POLICY"
while [ $# -gt 0 ]; do
  case "$1" in
    --moat) moat=${2:?$usage}; shift 2 ;;
    --guest-dir) guest_dir=${2:?$usage}; shift 2 ;;
    --workdir) workdir=${2:?$usage}; shift 2 ;;
    --serial) serial_in=${2:?$usage}; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "canary-vm: unknown argument $1" >&2; echo "$usage" >&2; exit 2 ;;
    *) [ -z "$policy" ] || { echo "$usage" >&2; exit 2; }; policy=$1; shift ;;
  esac
done
[ -f "$policy" ] || { echo "$usage" >&2; exit 2; }
[ -x "$moat" ] || { echo "canary-vm: no moat binary at $moat (--moat BIN)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "canary-vm: python3 missing (it writes the JSON)" >&2; exit 2; }
"$moat" check "$policy" >/dev/null || exit 2

own_workdir=""
[ -n "$workdir" ] || { workdir=$(mktemp -d "${TMPDIR:-/tmp}/moat-canary-vm.XXXXXX"); own_workdir=1; }
mkdir -p "$workdir"
serial="$workdir/serial.log"

if [ -n "$serial_in" ]; then
  cp "$serial_in" "$serial"
else
  command -v qemu-system-x86_64 >/dev/null || { echo "canary-vm: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2; exit 1; }
  "$here/build-guest.sh" "$guest_dir" >/dev/null || exit 1
  mac=$(sed -n 's/^[[:space:]]*mac[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$policy" | head -n 1)
  sock="$workdir/moat.sock"
  rm -f "$sock" "$serial"
  moat_pid="" qemu_pid=""
  cleanup() {
    for p in $qemu_pid $moat_pid; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
  }
  trap cleanup EXIT
  trap 'exit 130' INT TERM HUP
  "$moat" serve --socket "$sock" --policy "$policy" --once >"$workdir/moat.log" 2>&1 &
  moat_pid=$!
  for _ in $(seq 200); do [ -S "$sock" ] && break; kill -0 "$moat_pid" 2>/dev/null || break; sleep 0.05; done
  [ -S "$sock" ] || { echo "canary-vm: moat did not create $sock" >&2; cat "$workdir/moat.log" >&2; exit 1; }
  # The QEMU settings of scripts/qemu-e2e.sh (DESIGN.md, "Facts about the peers").
  timeout -k 5 "$timeout_s" qemu-system-x86_64 \
    -machine q35,accel=tcg -cpu max -m 256 \
    -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
    -chardev socket,id=net0,path="$sock" \
    -netdev vhost-user,id=net0,chardev=net0 \
    -device virtio-net-pci,netdev=net0,mac="$mac",vectors=0,romfile= \
    -kernel "$guest_dir/vmlinux" -initrd "$guest_dir/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 moat.run=/bin/canary-guest.sh" \
    -display none -serial "file:$serial" -monitor none -nodefaults -no-user-config -no-reboot \
    >"$workdir/qemu.log" 2>&1 </dev/null &
  qemu_pid=$!
  wait "$qemu_pid"
  qemu_status=$?
  qemu_pid=""
  echo "canary-vm: guest finished (qemu exit $qemu_status), logs in $workdir" >&2
fi

# Judge the rows; JSON written by python3 (names and details are escaped properly).
python3 - "$policy" "$serial" "$(realpath "$policy")" <<'EOF'
import hashlib, json, re, sys, time
policy_file, serial, path = sys.argv[1], sys.argv[2], sys.argv[3]
raw = open(policy_file, "rb").read()
vm = "unknown"
for line in raw.decode(errors="replace").splitlines():
    m = re.match(r'\s*name\s*=\s*"([^"]*)"', line)
    if m:
        vm = m.group(1)
        break
policy = {"path": path, "hash": "sha256:" + hashlib.sha256(raw).hexdigest()}
now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
rows = []
for line in open(serial, "rb").read().decode(errors="replace").replace("\r", "").splitlines():
    parts = line.split(None, 4)
    if len(parts) >= 4 and parts[0] == "MOAT-CHECK" and parts[1].startswith("canary-"):
        rows.append((parts[1][len("canary-"):], parts[2], parts[3], parts[4] if len(parts) > 4 else ""))
events = []
def alert(severity, attempt, expected, observed, detail):
    events.append({"event": "alert", "vm": vm, "policy": policy, "time": now, "severity": severity,
                   "attempt": attempt, "expected": expected, "observed": observed, "detail": detail})
finished = False
attempts = 0
for name, expected, observed, detail in rows:
    if name == "finished":
        finished = True
        continue
    attempts += 1
    want = "ok" if expected == "pass" else "blocked"
    if observed == want:
        continue
    if expected == "fail" and observed == "ok":
        alert("P1", name, "blocked", "through", detail)
    elif observed == "unsent":
        alert("P2", name, "blocked", "could not run", "the attempt never left the guest: " + detail)
    else:
        alert("P2", name, "through", "blocked", detail)
if not finished:
    alert("P2", "canary run", "the canary runs", "could not run",
          "the guest canary did not finish (%d rows; no canary-finished row)" % attempts)
for e in events:
    print(json.dumps(e))
print(json.dumps({"event": "round", "vm": vm, "policy": policy, "time": now,
                  "result": "pass" if not events else "fail", "attempts": attempts, "failed": len(events)}))
sys.exit(0 if not events else 1)
EOF
status=$?
# A temporary workdir goes; after a failed boot it stays for its logs (named on stderr).
if [ -n "$own_workdir" ]; then
  if [ "$status" = 0 ] || [ -n "$serial_in" ]; then rm -rf "$workdir"; else echo "canary-vm: logs in $workdir" >&2; fi
fi
exit "$status"
