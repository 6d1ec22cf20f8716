#!/usr/bin/env bash
# moat's main job, end to end: build moat, build a tiny Linux guest, boot it under QEMU
# behind `moat serve --policy policy/example.toml`, and print what the guest could and
# could not reach, as a table. Needs qemu-system-x86, linux-image-amd64, busybox-static,
# cpio, xz-utils. Usage: scripts/demo.sh [POLICY]. Logs stay in target/demo/.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
policy=${1:-policy/example.toml}
echo "1/4 building moat (cargo build --release)"
cargo build --release --quiet
echo "2/4 checking the policy: target/release/moat check $policy"
target/release/moat check "$policy"
echo "3/4 building the guest image (Debian kernel as ELF + busybox initramfs) into target/guest"
scripts/build-guest.sh target/guest | sed 's/^/    /'
echo "4/4 booting the guest behind moat (QEMU under TCG, about 30 s); its only NIC is moat's socket"
echo
status=0
scripts/qemu-e2e.sh --moat target/release/moat --policy "$policy" --workdir target/demo || status=$?
echo
if [ "$status" = 0 ]; then
  echo "every check matched the policy (serial console, moat log: target/demo/)"
else
  echo "some checks did not match (serial console, moat log: target/demo/)"
fi
exit "$status"
