#!/usr/bin/env bash
# Build a tiny test guest from Debian packages: an uncompressed ELF kernel (boots about twice
# as fast as the bzImage under TCG) and a busybox initramfs with the virtio_net modules and
# the guest-side checks. Usage: scripts/build-guest.sh OUTDIR
# Needs: linux-image-amd64, busybox-static, cpio, python3. No network.
set -euo pipefail
out=${1:?usage: build-guest.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"

kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || { echo "build-guest: no /boot/vmlinuz-* (apt-get install linux-image-amd64)" >&2; exit 1; }
kver=${kernel#/boot/vmlinuz-}
busybox=$(command -v busybox) || { echo "build-guest: no busybox (apt-get install busybox-static)" >&2; exit 1; }
if ldd "$busybox" >/dev/null 2>&1; then
  echo "build-guest: $busybox is dynamically linked; install busybox-static" >&2; exit 1
fi

# Rebuild only when an input is newer than the outputs.
stamp="$out/initramfs.cpio.gz"
if [ -f "$stamp" ] && [ -f "$out/vmlinux" ] && [ -z "$(find "$kernel" "$busybox" "$here/guest" "$0" -newer "$stamp" 2>/dev/null | head -n 1)" ]; then
  exit 0
fi

# Kernel: the xz stream after the "\xfd7zXZ\0" magic of the bzImage is the ELF vmlinux.
python3 - "$kernel" "$out/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
start = data.find(b'\xfd7zXZ\x00')
if start < 0:
    sys.exit("build-guest: no xz payload in " + sys.argv[1])
elf = lzma.LZMADecompressor().decompress(data[start:])
if elf[:4] != b'\x7fELF':
    sys.exit("build-guest: decompressed kernel is not an ELF file")
open(sys.argv[2], 'wb').write(elf)
PY

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,proc,sys,dev,tmp,etc/udhcpc,lib/modules,www}
cp "$busybox" "$root/bin/busybox"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net; do
  f=$(find "/lib/modules/$kver" -name "$m.ko*" | head -n 1)
  if [ -z "$f" ]; then
    # Built into this kernel: nothing to load.
    continue
  fi
  case "$f" in
    *.ko.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
  echo "$m" >> "$root/lib/modules/order"
done
cp "$here/guest/init" "$root/init"
cp "$here/guest/udhcpc.script" "$root/etc/udhcpc/default.script"
cp "$here/guest/checks.sh" "$root/bin/checks.sh"
chmod +x "$root/init" "$root/etc/udhcpc/default.script" "$root/bin/checks.sh"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$out/initramfs.cpio.gz.tmp")
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "build-guest: $out/vmlinux ($kver) and $out/initramfs.cpio.gz"
