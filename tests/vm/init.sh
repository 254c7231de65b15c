#!/bin/busybox sh
# Stage 1, in the initramfs: load virtio/9p/overlay, mount the host's / read-only over 9p with
# a throw-away tmpfs on top, then switch_root (not chroot: module auto-loading resolves
# /sbin/modprobe in the real root).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do
    insmod "/modules/$m.ko" || echo "vmrun init: insmod $m failed" >&2
done
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
    || { echo "vmrun init: cannot mount the host root" >&2; poweroff -f; }
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot \
    || { echo "vmrun init: overlay failed" >&2; poweroff -f; }
mkdir -p /newroot/run/vmrun
cp /bin/busybox /stage2.sh /newroot/run/vmrun/
exec switch_root /newroot /run/vmrun/busybox sh /run/vmrun/stage2.sh
