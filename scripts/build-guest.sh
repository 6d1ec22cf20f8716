#!/usr/bin/env bash
# Build a tiny test guest from Debian packages: an uncompressed ELF kernel (boots about twice
# as fast as the bzImage under TCG) and a busybox initramfs with the virtio_net modules and
# the guest-side checks. Usage: scripts/build-guest.sh OUTDIR
#   OUTDIR/vmlinux              ELF kernel extracted from the newest /boot/vmlinuz-*
#   OUTDIR/initramfs.cpio.gz    busybox, virtio_net modules, /init, udhcpc script, checks.sh
# /init runs the program named by `moat.run=PATH` on the kernel command line, else
# /bin/checks.sh, then prints MOAT-DONE and powers off.
# Needs: linux-image-amd64, busybox-static, cpio, gzip, xz-utils (or python3), zstd only
# for .ko.zst modules, flock. No network. Cached: nothing is rebuilt unless an input changed
# (content of scripts/guest/*, this script, the kernel and busybox files) or an output is
# missing. Safe to run concurrently for the same OUTDIR (flock).
set -euo pipefail
out=${1:?usage: build-guest.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
self="$here/$(basename "$0")"
die() { echo "build-guest: $*" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)

kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$kernel" ] || die "no /boot/vmlinuz-* (apt-get install linux-image-amd64)"
kver=${kernel#/boot/vmlinuz-}
[ -d "/lib/modules/$kver" ] || die "no /lib/modules/$kver for $kernel"
busybox=$(command -v busybox) || die "no busybox (apt-get install busybox-static)"
busybox=$(readlink -f "$busybox")
if ldd "$busybox" >/dev/null 2>&1; then
  die "$busybox is dynamically linked; install busybox-static"
fi
command -v cpio >/dev/null || die "no cpio (apt-get install cpio)"

exec 9>"$out/.lock"
flock 9

# Cache key: everything the outputs are made from. Comparing contents (not only mtimes)
# also catches an older checks.sh checked out over a newer build.
key=$(
  {
    echo "kernel $kernel $(stat -c '%s %Y' "$kernel")"
    echo "busybox $busybox $(stat -c '%s %Y' "$busybox")"
    find "/lib/modules/$kver" -name 'virtio*.ko*' -o -name '*failover.ko*' | sort | xargs -r stat -c '%n %s %Y'
    sha256sum "$self" "$here"/guest/* "$here/canary-guest.sh"
  } | sha256sum | cut -d' ' -f1
)
if [ -s "$out/vmlinux" ] && [ -s "$out/initramfs.cpio.gz" ] && [ "$(cat "$out/.key" 2>/dev/null)" = "$key" ] &&
  [ -z "$(find "$kernel" "$busybox" "$self" "$here/guest" "$here/canary-guest.sh" -newer "$out/.key" 2>/dev/null | head -n 1)" ]; then
  echo "build-guest: up to date: $out"
  exit 0
fi
rm -f "$out/.key"

# Kernel: the bzImage carries the ELF vmlinux as an xz stream after the "\xfd7zXZ\0" magic.
# Re-extract only when the kernel changed (it is most of the build time).
if [ ! -s "$out/vmlinux" ] || [ "$(cat "$out/.kernel" 2>/dev/null)" != "$kernel $(stat -c '%s %Y' "$kernel")" ]; then
  tmp="$out/vmlinux.tmp.$$"
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$kernel" 2>/dev/null | head -n 1 | cut -d: -f1 || true)
  if [ -n "$off" ] && command -v xz >/dev/null &&
    { tail -c +"$((off + 1))" "$kernel" || true; } | xz -dc --single-stream >"$tmp" 2>/dev/null; then
    :
  elif command -v python3 >/dev/null; then
    python3 - "$kernel" "$tmp" <<'PY'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
start = data.find(b'\xfd7zXZ\x00')
if start < 0:
    sys.exit("build-guest: no xz payload in " + sys.argv[1])
open(sys.argv[2], 'wb').write(lzma.LZMADecompressor().decompress(data[start:]))
PY
  else
    rm -f "$tmp"; die "cannot extract the kernel: need xz (xz-utils) or python3, and an xz-compressed $kernel"
  fi
  [ "$(head -c 4 "$tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || { rm -f "$tmp"; die "extracted kernel is not an ELF file"; }
  mv "$tmp" "$out/vmlinux"
  echo "$kernel $(stat -c '%s %Y' "$kernel")" >"$out/.kernel"
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,proc,sys,dev,tmp,etc/udhcpc,lib/modules,www}
cp "$busybox" "$root/bin/busybox"
: >"$root/lib/modules/order"
builtin=""
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net; do
  f=$(find "/lib/modules/$kver" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n 1)
  if [ -z "$f" ]; then
    # Not a module: either built into this kernel or missing; /init tells them apart.
    builtin="$builtin $m"
    continue
  fi
  case "$f" in
    *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
  echo "$m" >>"$root/lib/modules/order"
done
cp "$here/guest/init" "$root/init"
cp "$here/guest/udhcpc.script" "$root/etc/udhcpc/default.script"
cp "$here/guest/checks.sh" "$root/bin/checks.sh"
cp "$here/canary-guest.sh" "$root/bin/canary-guest.sh"
cp "$here/guest/restart.sh" "$root/bin/restart.sh"
# A hostile DNS-over-TCP client (static: the guest has no libc), when a compiler is here.
if command -v gcc >/dev/null; then
  gcc -static -O2 -o "$root/bin/dnsflood" "$here/guest/dnsflood.c" || die "cannot build guest/dnsflood.c (glibc's static libs come with build-essential)"
fi
chmod +x "$root/init" "$root/etc/udhcpc/default.script" "$root/bin/checks.sh" "$root/bin/canary-guest.sh" "$root/bin/restart.sh"
tmp="$out/initramfs.cpio.gz.tmp.$$"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 >"$tmp")
mv "$tmp" "$out/initramfs.cpio.gz"
echo "$key" >"$out/.key"
echo "build-guest: $out/vmlinux ($kver) and $out/initramfs.cpio.gz (modules: $(tr '\n' ' ' <"$root/lib/modules/order")${builtin:+; not modules:$builtin})"
