# Stage 2, in the host's root (read-only 9p + tmpfs overlay): finish the system set-up, run the
# job with its output on the vmrun.out port and its exit status on vmrun.rc, power off.
B=/run/vmrun/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
$B mkdir -p /dev/pts /dev/shm
$B mount -t devpts devpts /dev/pts
$B mount -t tmpfs tmpfs /dev/shm
for arg in $($B cat /proc/cmdline); do
    case "$arg" in
        vmrun.rundir=*) RUNDIR=${arg#vmrun.rundir=} ;;
        vmrun.moddir=*) MODDIR=${arg#vmrun.moddir=} ;;
    esac
done
$B mkdir -p /lib/modules
$B rm -rf "/lib/modules/$($B uname -r)"
$B ln -s "$MODDIR" "/lib/modules/$($B uname -r)"
$B ip link set lo up
$B hostname vmrun
OUT=/dev/null
RC=/dev/null
for p in /sys/class/virtio-ports/*; do
    case "$($B cat "$p/name")" in
        vmrun.out) OUT=/dev/${p##*/} ;;
        vmrun.rc) RC=/dev/${p##*/} ;;
    esac
done
[ -e "$OUT" ] || OUT=/dev/null
/bin/sh "$RUNDIR/job.sh" </dev/null >"$OUT" 2>&1
echo $? >"$RC"
$B sync
$B poweroff -f
