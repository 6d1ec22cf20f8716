#!/usr/bin/env bash
# Downloads into the real QEMU guest (TCG), byte-exact: through moat (its transparent proxy
# path, to tinyproxy on loopback, as tests/qemu_e2e.rs wires it) and through passt in
# vhost-user mode (its NAT: the gateway address mapped to the host's loopback). Issue 14 asks
# whether passt's short downloads in the bench are passt's or the simulated guest's.
# Usage: [PASST=/path/to/passt] scripts/real-guest-download.sh [--moat BIN] [--runs N]
#                                [--mib M] [--mtu BYTES] [--guest-csum-off] [--guest-tso-off]
#                                [--only moat|passt] [--workdir DIR]
# PASST unset: the passt rows are skipped (this script never builds passt). The origin is a
# python3 HTTP server on 127.0.0.1 sending M MiB (default 16) of 16-byte lines "%015d\n";
# the guest fetches the file N times (default 3) with busybox wget and prints the byte count
# and md5 of each, and, when they differ from the origin's, the byte offsets where the
# stream leaves the pattern (a line number that jumps, a line that is not a pattern line). --mtu: the MTU passt announces by
# DHCP (its default is 65520; moat announces 1500). --guest-csum-off: the guest does not
# offer VIRTIO_NET_F_GUEST_CSUM (QEMU guest_csum=off), so the backend may not mark frames
# DATA_VALID and the guest's TCP checks every checksum (DL-TCP InCsumErrors).
# --guest-tso-off: the guest takes no TSO/ECN/UFO frames (QEMU guest_tso4/6, guest_ecn,
# guest_ufo=off), so moat too hands it frames of at most its 1500 B MTU, as passt does.
# Each backend's CPU (all its threads, from boot to the guest's power-off)
# is printed with the bytes its guest received: throughput per backend CPU-second, the issue's
# download figure, and (moat) the CONNECT proxy's CPU beside it.
# Exit 0 iff every download was whole.
# PASST_OPTS: more passt options (e.g. "--pcap FILE").
# Network: loopback only; the guest's one NIC is the vhost-user socket.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
csum_off="" tso_off="" moat="$repo/target/release/moat" runs=3 mib=16 mtu="" only="" workdir=""
usage="usage: [PASST=/path/to/passt] real-guest-download.sh [--moat BIN] [--runs N] [--mib M] [--mtu BYTES] [--guest-csum-off] [--guest-tso-off] [--only moat|passt] [--workdir DIR]"
while [ $# -gt 0 ]; do
  case "$1" in
    --moat) moat=${2:?$usage}; shift 2 ;;
    --runs) runs=${2:?$usage}; shift 2 ;;
    --mib) mib=${2:?$usage}; shift 2 ;;
    --mtu) mtu=${2:?$usage}; shift 2 ;;
    --guest-csum-off) csum_off=1; shift ;;
    --guest-tso-off) tso_off=1; shift ;;
    --only) only=${2:?$usage}; shift 2 ;;
    --workdir) workdir=${2:?$usage}; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "real-guest-download: unknown argument $1" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
for t in qemu-system-x86_64 python3 tinyproxy cpio gzip; do
  command -v "$t" >/dev/null || { echo "real-guest-download: $t missing" >&2; exit 1; }
done
size=$((mib * 1024 * 1024))
timeout_s=${MOAT_DL_TIMEOUT:-$((300 + runs * mib * 20))}

"$here/build-guest.sh" "$repo/target/guest" >/dev/null
[ -n "$workdir" ] || workdir=$(mktemp -d "${TMPDIR:-/tmp}/moat-dl.XXXXXX")
mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)

pids=""
cleanup() {
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# The guest's program, appended to the cached initramfs as a second cpio archive (the
# kernel unpacks both), so the shared guest image and its checks stay as they are.
mkdir -p "$workdir/overlay/bin"
cat >"$workdir/overlay/bin/download.sh" <<'GUEST'
#!/bin/sh
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
url=$(arg dl.url) runs=$(arg dl.runs) size=$(arg dl.size) want=$(arg dl.md5)
now() { cut -d' ' -f1 /proc/uptime; }
ip link set eth0 up
udhcpc -i eth0 -n -q -t 5 -T 2 >/dev/null 2>&1 || echo "DL-NOTE dhcp failed"
echo "DL-NET $(ip -4 addr show eth0 | sed -n 's/.*inet \([^ ]*\).*/\1/p') mtu=$(cat /sys/class/net/eth0/mtu) gw=$(cat /tmp/dhcp-router 2>/dev/null) features=$(cat /sys/class/net/eth0/device/features 2>/dev/null | cut -c1-24)"
i=1
while [ "$i" -le "$runs" ]; do
  rm -f /tmp/dl
  t0=$(now)
  # The md5 of the stream as wget hands it over (stream=), and of the file it wrote, read
  # back afterwards (md5=): they differ if the guest's memory changed under the file.
  stream=$({ timeout 900 wget -q -O - "$url"; echo $? >/tmp/rc; } | tee /tmp/dl | md5sum | cut -d' ' -f1)
  rc=$(cat /tmp/rc)
  t1=$(now)
  n=$(wc -c </tmp/dl 2>/dev/null || echo 0)
  sum=$(md5sum </tmp/dl | cut -d' ' -f1)
  first=-
  if [ "$sum" != "$want" ]; then
    # Where the stream leaves the pattern, in one pass: each line should be the previous
    # line's number plus one; print (up to 12) the byte offsets where a number jumps or a
    # line is not a whole pattern line, then how many of each and where the last jump is.
    first=$(awk '{
        if (length($0) != 15 || $0 !~ /^[0-9]+$/) {
          odd++; if (e < 12) { printf "odd@%d:%s ", off, substr($0, 1, 20); e++ }
        } else {
          v = $0 + 0
          if (v != p + 1 && (NR > 1 || v != 0)) {
            j++; last = off; if (e < 12) { printf "jump@%d:%d->%d ", off, p, v; e++ }
          }
          p = v
        }
        off += length($0) + 1
      } END { printf "odd-lines=%d jumps=%d last-jump@%d", odd, j, last }' /tmp/dl | tr ' ' ',')
  fi
  echo "DL-RESULT $i rc=$rc bytes=$n md5=$sum stream=$stream secs=$(awk "BEGIN { print $t1 - $t0 }") first-diff=$first"
  i=$((i + 1))
done
tcp() { awk -v k="$1" '/^Tcp:/ { if (!h) { for (i = 1; i <= NF; i++) c[$i] = i; h = 1 } else print $c[k] }' /proc/net/snmp; }
echo "DL-TCP InCsumErrors=$(tcp InCsumErrors) InErrs=$(tcp InErrs) RetransSegs=$(tcp RetransSegs) InSegs=$(tcp InSegs)"
echo "DL-RX $(cat /sys/class/net/eth0/statistics/rx_packets) packets $(cat /sys/class/net/eth0/statistics/rx_bytes) bytes, $(cat /sys/class/net/eth0/statistics/rx_dropped) dropped"
GUEST
chmod +x "$workdir/overlay/bin/download.sh"
(cd "$workdir/overlay" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$workdir/overlay.cpio.gz"
cat "$repo/target/guest/initramfs.cpio.gz" "$workdir/overlay.cpio.gz" >"$workdir/initramfs.cpio.gz"

# The origin: the pattern, with a Content-Length, on 127.0.0.1 (an ephemeral port).
cat >"$workdir/origin.py" <<'PY'
import http.server, socketserver, sys, hashlib
size, portfile = int(sys.argv[1]), sys.argv[2]
body = b"".join(b"%015d\n" % i for i in range(size // 16))
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        sys.stderr.write("origin: %s %s\n" % (self.client_address[0], fmt % args))
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
s = S(("127.0.0.1", 0), H)
with open(portfile + ".tmp", "w") as f:
    f.write("%d %s\n" % (s.server_address[1], hashlib.md5(body).hexdigest()))
import os; os.rename(portfile + ".tmp", portfile)
s.serve_forever()
PY
python3 "$workdir/origin.py" "$size" "$workdir/origin.txt" 2>"$workdir/origin.log" &
pids="$pids $!"
for _ in $(seq 200); do [ -s "$workdir/origin.txt" ] && break; sleep 0.1; done
read -r port want <"$workdir/origin.txt"
echo "origin: 127.0.0.1:$port, $size bytes, md5 $want"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

boot() { # name socket url: one QEMU guest on the vhost-user socket, its results on stdout
  local name=$1 sock=$2 url=$3 serial="$workdir/$1.serial.log"
  local start
  start=$(date +%s)
  # vectors=0: with MSI-X QEMU 7.2 under TCG crashes when vhost-user starts. share=on
  # guest RAM: the backend maps it (memfd).
  timeout -k 5 "$timeout_s" qemu-system-x86_64 \
    -machine q35,accel=tcg -cpu max -smp 1 -m 256 \
    -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
    -chardev socket,id=net0,path="$sock" \
    -netdev vhost-user,id=net0,chardev=net0 \
    -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=0,romfile=${csum_off:+,guest_csum=off}${tso_off:+,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off} \
    -kernel "$repo/target/guest/vmlinux" -initrd "$workdir/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 moat.run=/bin/download.sh dl.url=$url dl.runs=$runs dl.size=$size dl.md5=$want" \
    -display none -serial "file:$serial" -monitor none -nodefaults -no-user-config -no-reboot \
    >"$workdir/$name.qemu.log" 2>&1 </dev/null || echo "$name: qemu exited $? after $(($(date +%s) - start))s (log $workdir/$name.qemu.log)"
  tr -d '\r' <"$serial" | grep -E '^DL-' | sed "s/^/$name: /" || echo "$name: no DL- lines (serial: $serial)"
  grep -q '^MOAT-DONE' "$serial" || echo "$name: the guest did not finish within ${timeout_s}s"
}

# A process's CPU so far, in seconds: utime + stime of the whole process, in clock ticks
# (10 ms; exited threads included: moat's vring workers end with the guest, before this is
# read, so their schedstat is gone).
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat"; }
# Bytes the guest received in this backend's downloads, from its DL-RESULT lines.
got_bytes() { grep "^$1: DL-RESULT" "$results" | sed -n 's/.* bytes=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }'; }
cpu_line() { # name backend-cpu-s [proxy-cpu-s]
  local b
  b=$(got_bytes "$1")
  echo "$1: DL-CPU backend_cpu_s=$2${3:+ proxy_cpu_s=$3} bytes=$b MiB_per_backend_cpu_s=$(awk -v b="$b" -v c="$2" 'BEGIN { if (c > 0) printf "%.1f", b / 1048576 / c; else print "-" }')"
}

results="$workdir/results.txt"
: >"$results"

if [ -z "$only" ] || [ "$only" = moat ]; then
  [ -x "$moat" ] || { echo "real-guest-download: no moat binary at $moat (cargo build --release)" >&2; exit 1; }
  pport=$(free_port)
  cat >"$workdir/tinyproxy.conf" <<EOF
Port $pport
Listen 127.0.0.1
Timeout 600
MaxClients 16
LogLevel Info
LogFile "$workdir/tinyproxy.log"
Allow 127.0.0.1
DisableViaHeader Yes
EOF
  tinyproxy -d -c "$workdir/tinyproxy.conf" >/dev/null 2>&1 &
  pids="$pids $!"
  tp=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$pport") 2>/dev/null && break; sleep 0.1; done
  cat >"$workdir/moat.toml" <<EOF
[vm]
name = "real-guest-download"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/30"
[proxy]
http = "127.0.0.1:$pport"
[[outbound]]
protocol = "tcp"
ports = [$port]
to = ["localhost", "127.0.0.1/32"]
[dns]
allow = ["localhost"]
EOF
  "$moat" serve --socket "$workdir/moat.sock" --policy "$workdir/moat.toml" >"$workdir/moat.log" 2>&1 &
  mp=$!
  pids="$pids $mp"
  for _ in $(seq 200); do [ -S "$workdir/moat.sock" ] && break; sleep 0.05; done
  boot moat "$workdir/moat.sock" "http://localhost:$port/" | tee -a "$results"
  cpu_line moat "$(cpu_s "$mp")" "$(cpu_s "$tp")" | tee -a "$results"
  kill "$mp" "$tp" 2>/dev/null || true
  wait "$mp" "$tp" 2>/dev/null || true
fi

if [ -z "$only" ] || [ "$only" = passt ]; then
  if [ -z "${PASST:-}" ]; then
    echo "passt: skipped (set PASST=/path/to/passt, built from its source; this script does not build it)"
    skipped=1
  else
    # Foreground, quiet, the guest's address and gateway given (the host's own are not
    # copied), the gateway mapped to the host's loopback, no port forwarding into the guest.
    "$PASST" --vhost-user -f -q -s "$workdir/passt.sock" -a 10.0.0.2 -n 24 -g 10.0.0.1 \
      --map-host-loopback 10.0.0.1 -t none -u none ${mtu:+-m "$mtu"} ${PASST_OPTS:-} >"$workdir/passt.log" 2>&1 &
    pp=$!
    pids="$pids $pp"
    for _ in $(seq 200); do [ -S "$workdir/passt.sock" ] && break; sleep 0.05; done
    [ -S "$workdir/passt.sock" ] || { echo "passt: no socket"; cat "$workdir/passt.log"; }
    boot passt "$workdir/passt.sock" "http://10.0.0.1:$port/" | tee -a "$results"
    cpu_line passt "$(cpu_s "$pp")" | tee -a "$results"
    kill "$pp" 2>/dev/null || true
    wait "$pp" 2>/dev/null || true
  fi
fi

mr=$(sed -n 's/^moat: DL-CPU.*MiB_per_backend_cpu_s=\([0-9.]*\).*/\1/p' "$results")
pr=$(sed -n 's/^passt: DL-CPU.*MiB_per_backend_cpu_s=\([0-9.]*\).*/\1/p' "$results")
if [ -n "$mr" ] && [ -n "$pr" ]; then
  echo "download bytes per backend CPU-second, moat / passt: $mr / $pr MiB/s = $(awk -v a="$mr" -v b="$pr" 'BEGIN { printf "%.2f", a / b }')"
fi
total=$(grep -c 'DL-RESULT' "$results" || true)
whole=$(grep 'DL-RESULT' "$results" | grep -c "bytes=$size md5=$want" || true)
echo "whole downloads: $whole of $total ($size bytes, md5 $want); logs in $workdir"
[ "$whole" = "$total" ] && { [ "$total" -gt 0 ] || [ -n "${skipped:-}" ]; }
