#!/usr/bin/env bash
# moat's main job, end to end: build moat, build a tiny Linux guest, boot it under QEMU
# behind `moat serve --policy policy/example.toml`, and print what the guest could and
# could not reach, as a table. Needs qemu-system-x86, linux-image-amd64, busybox-static.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
policy=${1:-policy/example.toml}
echo "1/3 building moat (release)"
cargo build --release --quiet
echo "2/3 building the guest image (Debian kernel + busybox initramfs) into target/guest"
scripts/build-guest.sh target/guest >/dev/null
echo "3/3 booting the guest behind moat with $policy (QEMU under TCG, about 30 s)"
echo
target/release/moat check "$policy"
echo
scripts/qemu-e2e.sh --moat target/release/moat --policy "$policy" --workdir target/demo
