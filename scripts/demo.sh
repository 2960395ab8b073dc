#!/usr/bin/env bash
# Install vfsnap, build a demo share (a local directory with a volume and a snapshot chain in
# Cinder's layout) and mount it, so you can look around with ls, cat and friends.
#   DEMO_DIR (default /var/tmp/vfsnap-demo) holds share/ and mnt/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

demo=${DEMO_DIR:-/var/tmp/vfsnap-demo}
share=$demo/share
mnt=$demo/mnt
vfsnap=$PWD/.venv/bin/vfsnap

if mountpoint -q "$mnt" 2>/dev/null; then
    fusermount3 -u "$mnt" || umount "$mnt"
fi
rm -rf "$share"
mkdir -p "$share" "$mnt"

# A 64 MiB raw volume whose first bytes say which version of the disk you are reading.
page() { printf '%-4095s\n' "$1"; }
qemu-img create -q -f raw "$share/demo" 64M
page "demo disk, version 1 (snapshot before-upgrade holds this)" | dd of="$share/demo" conv=notrunc status=none
# Snapshot "before-upgrade": a qcow2 overlay over the base, as Cinder names it.
qemu-img create -q -f qcow2 -b demo -F raw "$share/demo.before-upgrade" 64M
page "demo disk, version 2 (snapshot after-upgrade holds this)" > "$demo/page"
qemu-io -f qcow2 -c "write -s $demo/page 0 4096" "$share/demo.before-upgrade" >/dev/null
qemu-img create -q -f qcow2 -b demo.before-upgrade -F qcow2 "$share/demo.after-upgrade" 64M
page "demo disk, version 3 (the live volume)" > "$demo/page"
qemu-io -f qcow2 -c "write -s $demo/page 0 4096" "$share/demo.after-upgrade" >/dev/null
rm -f "$demo/page"
python3 - "$share" <<'PY'
import json, sys
info = {"active": "demo.after-upgrade", "before-upgrade": "demo.before-upgrade", "after-upgrade": "demo.after-upgrade"}
with open(f"{sys.argv[1]}/demo.info", "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
PY

"$vfsnap" mount "$share" "$mnt"
for _ in $(seq 50); do mountpoint -q "$mnt" && break; sleep 0.1; done

cat <<MSG

vfsnap is mounted on $mnt (share: $share). Try:

  ls -l $mnt/volumes $mnt/snapshots/demo
  head -c 64 $mnt/volumes/demo; echo
  head -c 64 $mnt/snapshots/demo/before-upgrade/demo; echo
  head -c 64 $mnt/snapshots/demo/latest/demo; echo
  $vfsnap status $mnt
  getfattr -d $mnt/volumes/demo
  df -h $mnt

Unmount with: umount $mnt
MSG
