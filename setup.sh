#!/usr/bin/env bash
# Set up erofs-nbdd on a Debian machine (as root) and then:
#   ./setup.sh serve [ARGS...]  build images/demo.erofs if missing and serve images/ on :10809
#   ./setup.sh test             the whole test suite: ruff, mypy --strict, pytest on the host,
#                               then the kernel tests inside a VM (tests/vm/vmrun.py)
#   ./setup.sh test-host [ARGS] only the host tests (ARGS go to pytest)
#   ./setup.sh test-kernel [ARGS] only the kernel tests, in the VM (ARGS go to pytest)
#   ./setup.sh bench [ARGS]     the benchmark against nbdkit and qemu-nbd (--quick: under 3 min)
#   ./setup.sh install          only install (system packages, .venv)
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(erofs-utils libnbd-bin python3-libnbd nbdkit qemu-utils fio python3-venv kmod
    docker-registry skopeo apache2-utils curl)
VENV=${VENV:-.venv}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_system() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: missing Debian packages: ${missing[*]}" >&2
        echo "setup.sh: run as root, or: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        python3 -m venv "$VENV"
    fi
    say "installing erofs-nbdd and its test tools into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e '.[test]'
}

build_demo() {
    if [ -f images/demo.erofs ]; then return 0; fi
    say "building images/demo.erofs (this project's sources as a read-only file system)"
    mkdir -p images
    local tree
    tree=$(mktemp -d)
    cp -r README.md erofs_nbdd client "$tree"/
    find "$tree" -name __pycache__ -prune -exec rm -rf {} +
    mkfs.erofs -zlz4hc images/demo.erofs "$tree" >/dev/null
    rm -rf "$tree"
}

kernel_tests() {
    say "pytest (kernel tests, inside a VM booted with qemu)"
    # a guest writes nothing back: compile here so the guest does not import from source
    "$VENV/bin/python" -m compileall -q "$VENV/lib" erofs_nbdd client tests >/dev/null
    "$VENV/bin/python" tests/vm/vmrun.py --timeout 2400 -- \
        "$VENV/bin/python" -m pytest tests/kernel -p no:cacheprovider "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
    install)
        install_system; install_python ;;
    bench)
        install_system; install_python
        "$VENV/bin/python" -m pip install -q -e '.[bench]'
        exec "$VENV/bin/python" -m bench.run "$@" ;;
    serve)
        install_system; install_python; build_demo
        say "serving images/ on port 10809 (try: nbdinfo --list nbd://localhost); Ctrl-C stops"
        exec "$VENV/bin/erofs-nbdd" serve images/ "$@" ;;
    test)
        install_system; install_python
        say "ruff"
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        say "mypy --strict"
        "$VENV/bin/mypy"
        # pytest exits 5 when it collected no test: a failure here, like any non-zero status
        say "pytest (host)"
        "$VENV/bin/python" -m pytest
        kernel_tests ;;
    test-host)
        install_system; install_python
        exec "$VENV/bin/python" -m pytest "$@" ;;
    test-kernel)
        install_system; install_python
        kernel_tests "$@" ;;
    *)
        echo "usage: ./setup.sh serve [ARGS...] | test | test-host [ARGS] | test-kernel [ARGS] | install" >&2
        exit 2 ;;
esac
