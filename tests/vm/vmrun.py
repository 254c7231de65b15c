"""Run a command as root inside a Debian kernel booted with qemu (TCG), sharing the host's /.

The host kernel has no NBD driver, so kernel-level tests run here. The guest sees the host's
root read-only over 9p with a tmpfs on top (writes vanish), boots in a few seconds, and the
command's output streams back through a virtio serial port. Exit status: the command's own;
124 when --timeout fires; 255 when the guest gave no status (the console log tail is printed).

    python tests/vm/vmrun.py [--timeout S] [--memory MB] -- COMMAND [ARGS...]

First use downloads the current Debian kernel package (apt-get download) into the cache; see
setup_kernel(). Facts and pitfalls behind every choice: shared/vm-kernel-tests.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("VMRUN_CACHE", Path.home() / ".cache" / "erofs-nbdd-vm"))
HOST_PACKAGES = ["qemu-system-x86", "busybox-static", "cpio", "kmod"]
# Loaded in the initramfs (with their dependencies, from modules.dep).
INITRAMFS_MODULES = ["virtio_pci", "virtio_console", "9p", "9pnet_virtio", "overlay"]


def log(message: str) -> None:
    print(f"vmrun: {message}", file=sys.stderr, flush=True)


def run_quiet(cmd: list[str], **kw: object) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


def ensure_host_packages() -> None:
    missing = [
        p
        for p in HOST_PACKAGES
        if subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
        ).stdout.find("ok installed")
        < 0
    ]
    if missing:
        log(f"installing {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run_quiet(["apt-get", "update", "-qq"], env=env)
        run_quiet(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def kernel_package() -> str:
    """The package linux-image-amd64 depends on now (the ABI changes with security updates)."""
    out = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        word = line.strip().removeprefix("Depends: ")
        if word.startswith("linux-image-") and word[12:13].isdigit():
            return word
    raise SystemExit("vmrun: cannot find the Debian kernel package (run apt-get update)")


def setup_kernel() -> tuple[Path, Path, str]:
    """(vmlinuz, module dir, version), unpacked once into the cache."""
    try:
        package = kernel_package()
    except (subprocess.CalledProcessError, SystemExit):
        run_quiet(["apt-get", "update", "-qq"])
        package = kernel_package()
    version = package.removeprefix("linux-image-")
    root = CACHE / package
    vmlinuz = root / "boot" / f"vmlinuz-{version}"
    moddir = root / "lib" / "modules" / version
    if not (moddir / "modules.dep").exists():
        log(f"downloading and unpacking {package} (once)")
        with tempfile.TemporaryDirectory(dir=CACHE.parent if CACHE.parent.exists() else None) as d:
            run_quiet(["apt-get", "download", package], cwd=d, stderr=subprocess.DEVNULL)
            (deb,) = Path(d).glob("*.deb")
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            run_quiet(["dpkg-deb", "-x", str(deb), str(root)])
        # the .deb ships no modules.dep (its postinst makes it)
        run_quiet(["depmod", "-b", str(root), version])
    return vmlinuz, moddir, version


def module_closure(moddir: Path, names: list[str]) -> list[Path]:
    """The .ko files for ``names`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        name = Path(path).name.removesuffix(".ko").replace("-", "_")
        paths[name] = path
        deps[name] = [Path(p).name.removesuffix(".ko").replace("-", "_") for p in rest.split()]
    builtin = {
        Path(line).name.removesuffix(".ko").replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().splitlines()
    }
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered or name in builtin:
            return
        if name not in paths:
            raise SystemExit(f"vmrun: module {name} is not in {moddir}")
        for dep in reversed(deps[name]):  # modules.dep lists the nearest dependency first
            visit(dep)
        ordered.append(name)

    for name in names:
        visit(name)
    return [moddir / paths[n] for n in ordered]


def build_initramfs(moddir: Path) -> Path:
    modules = module_closure(moddir, INITRAMFS_MODULES)
    busybox = Path("/bin/busybox")
    digest = hashlib.sha256()
    for path in [HERE / "init.sh", HERE / "stage2.sh", busybox, *modules]:
        digest.update(str(path).encode() + path.read_bytes())
    image = CACHE / f"initramfs-{digest.hexdigest()[:16]}.cpio"
    if image.exists():
        return image
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for sub in ("bin", "proc", "sys", "dev", "modules"):
            (root / sub).mkdir()
        shutil.copy(busybox, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        shutil.copy(HERE / "init.sh", root / "init")
        shutil.copy(HERE / "stage2.sh", root / "stage2.sh")
        os.chmod(root / "init", 0o755)
        for ko in modules:
            shutil.copy(ko, root / "modules" / ko.name)
        (root / "modules.list").write_text("\n".join(ko.stem for ko in modules) + "\n")
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        with open(image.with_suffix(".tmp"), "wb") as out:
            subprocess.run(
                ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
                cwd=root,
                input=files,
                stdout=out,
                check=True,
            )
        image.with_suffix(".tmp").rename(image)
    return image


def run(command: list[str], *, timeout: float, memory: int, cpus: int) -> int:
    if os.geteuid() != 0:
        raise SystemExit("vmrun: run as root (the guest job runs as root over the host's /)")
    ensure_host_packages()
    CACHE.mkdir(parents=True, exist_ok=True)
    vmlinuz, moddir, _ = setup_kernel()
    initramfs = build_initramfs(moddir)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    env_keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "CI")}
    env_keep |= {"VMRUN_GUEST": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    job = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env_keep.items())
    job += f"cd {shlex.quote(os.getcwd())} || exit 125\n"
    job += "exec " + shlex.join(command) + "\n"
    (rundir / "job.sh").write_text(job)
    read_end, write_end = os.pipe()
    append = (
        "console=ttyS0 quiet loglevel=4 panic=-1 oops=panic mitigations=off "
        f"vmrun.rundir={rundir} vmrun.moddir={moddir}"
    )
    qemu = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-machine",
        "pc",
        "-smp",
        str(cpus),
        "-m",
        str(memory),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-kernel",
        str(vmlinuz),
        "-initrd",
        str(initramfs),
        "-append",
        append,
        "-serial",
        f"file:{rundir / 'console.log'}",
        "-device",
        "virtio-serial-pci,id=vser",
        "-chardev",
        f"file,id=out,path=/proc/self/fd/{write_end}",
        "-device",
        "virtserialport,chardev=out,name=vmrun.out,bus=vser.0",
        "-chardev",
        f"file,id=rc,path={rundir / 'rc'}",
        "-device",
        "virtserialport,chardev=rc,name=vmrun.rc,bus=vser.0",
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
    ]
    if os.environ.get("VMRUN_DEBUG"):
        log(shlex.join(qemu))
    process = subprocess.Popen(
        qemu,
        pass_fds=(write_end,),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    os.close(write_end)

    def copy_output() -> None:  # our own pipe: qemu writing to our stdout could clobber it
        with os.fdopen(read_end, "rb", buffering=0) as src:
            while chunk := src.read(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()

    copier = threading.Thread(target=copy_output, daemon=True)
    copier.start()

    def forward(signum: int, _frame: object) -> None:
        os.killpg(process.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log(f"timed out after {timeout:.0f} s; the guest was killed")
        _console_tail(rundir)
        return 124
    copier.join(10)
    rc_text = (rundir / "rc").read_text().strip() if (rundir / "rc").exists() else ""
    if not rc_text.isdigit():
        log(f"the guest gave no exit status (qemu exited {process.returncode})")
        _console_tail(rundir)
        return 255
    shutil.rmtree(rundir, ignore_errors=True)
    return int(rc_text)


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _console_tail(rundir: Path) -> None:
    console = rundir / "console.log"
    if console.exists():
        lines = console.read_text(errors="replace").splitlines()[-40:]
        log(f"last console lines ({console}):\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    return run(command, timeout=args.timeout, memory=args.memory, cpus=args.cpus)


if __name__ == "__main__":
    sys.exit(main())
