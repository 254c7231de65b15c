"""No client can starve, lock out or break the others (issue 19), against the server as a
process: the attacker runs in processes of its own (flood.py), from loopback addresses of
its own, and a victim client here measures what it is left with.

The bounds are the issue's acceptance criteria, a wide margin over what is measured here
(a victim's worst 4 KiB read under a flood: 2-6 ms; nbdkit: 32-101 ms): the victim's worst
read under a flood at most 50 ms, a new client negotiated within 1 s, RSS back within
30 MiB of where it was once the attack is gone. Where latency is measured, the server has
the first CPU and the clients share the others (as ``bench --pin split``), the attackers
at the lowest priority: with two cores, four busy threads would otherwise measure the
kernel's scheduler as much as the server's.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from erofs_nbdd.protocol import OptionAck, ServerEntry

from ..conftest import evict, random_image
from ..interop.conftest import (
    RunningServer,
    start_server_process,
    stop_server_process,
    wait_for_log,
)
from .conftest import RawClient, assert_serves, log_problems

ROOT = Path(__file__).resolve().parents[2]
CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU = ("taskset", "-c", str(CPUS[0])) if len(CPUS) > 1 and shutil.which("taskset") else ()
CLIENT_CPUS = set(CPUS[1:]) if SERVER_CPU else set(CPUS)
WORST_READ = 0.050
NEGOTIATE_WITHIN = 1.0
RSS_SLACK_MIB = 30

Raw = Callable[..., RawClient]


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``demo``: 128 MiB of random bytes, so 1 MiB reads at spread offsets miss the cache."""
    root = tmp_path_factory.mktemp("big") / "images"
    random_image(root, "demo", 128 << 20)
    return root


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Servers of the test's own, checked when it ends: alive, serving nbdcopy, a clean log."""
    started: list[tuple[RunningServer, Path | None]] = []

    def start(root: Path, *args: str, tls_dir: Path | None = None) -> RunningServer:
        server = start_server_process(root, *args, prefix=SERVER_CPU)
        started.append((server, tls_dir))
        return server

    yield start
    for server, tls_dir in started:
        assert server.process.poll() is None, server.log_text()
        assert_serves(server, tls_dir=tls_dir)
        assert stop_server_process(server) == 0
        assert not log_problems(server.log_text()), server.log_text()


def _attacker() -> None:
    """An attacker's process: off the server's CPU, and behind the victim on its own (from
    another machine it would not take the victim's CPU either)."""
    os.sched_setaffinity(0, CLIENT_CPUS)
    os.nice(19)


class Flood:
    """Attacking processes (flood.py); all stopped when the test ends."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, address: str, kind: str, *args: str, seconds: float = 60) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.robustness.flood", address, kind, str(seconds), *args],
            cwd=ROOT,
            preexec_fn=_attacker,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line == "ready", f"the {kind} flood did not start: {line!r}"

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(30)
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()
        self.processes.clear()


@pytest.fixture
def flood() -> Iterator[Flood]:
    """Attackers, and this process (the victim) off the server's CPU while they run."""
    made = Flood()
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, CLIENT_CPUS)
    try:
        yield made
    finally:
        os.sched_setaffinity(0, mine)
        made.stop()


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """This process's garbage collector off while it measures: a full collection of the
    test process's heap takes longer than the bounds measured."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def worst_read(client: RawClient, seconds: float, size: int = 4096) -> tuple[float, int]:
    """(the slowest, how many) of ``size``-byte reads one after another for ``seconds``."""
    worst, count = 0.0, 0
    end = time.monotonic() + seconds
    with no_gc():
        while time.monotonic() < end and count < 1_000_000:
            start = time.perf_counter()
            error, data = client.read(4096 * (count % 512), size)
            worst = max(worst, time.perf_counter() - start)
            assert error == 0 and len(data) == size
            count += 1
    return worst, count


def negotiation_time(raw: Raw, address: str, *, keep: bool = False, **kw: object) -> float:
    """Seconds from connecting to transmission (the client stays open with ``keep``)."""
    with no_gc():
        start = time.perf_counter()
        client = raw(address, **kw)
        client.go()
        took = time.perf_counter() - start
    if not keep:
        client.close()
    return took


def rss_back(server: RunningServer, limit: float, seconds: float = 20) -> float:
    """The server's RSS once it is at most ``limit`` MiB, or after ``seconds``."""
    end = time.monotonic() + seconds
    rss = server.rss_mib()
    while rss > limit and time.monotonic() < end:
        time.sleep(0.2)
        rss = server.rss_mib()
    return rss


@pytest.mark.parametrize("kind", ["cache", "read512", "cache-tls"])
def test_a_pipelining_client_cannot_stall_the_others(
    kind: str,
    images: Path,
    made_certs: Path,
    serve: Callable[..., RunningServer],
    raw: Raw,
    flood: Flood,
) -> None:
    """A client pipelining cheap requests as fast as it can (CACHE, cached 512-byte
    reads; in the clear or over TLS), reading every reply. The victim's 4 KiB reads waited
    1.7-4.1 s, and a new client took 10.6 s to negotiate (past the handshake deadline):
    the request loop reached a scheduling point once per 150,000 requests."""
    server = serve(images, "--tls", "on", "--tls-certificates", str(made_certs))
    victim = raw(server.address)
    victim.go()
    worst_read(victim, 0.2)  # warm
    name, _, tls = kind.partition("-")
    args = ["--tls", str(made_certs / "clients" / "alice")] if tls else []
    flood.start(server.address, name, *args, "--source", "127.0.0.2")
    time.sleep(0.3)  # let it get going
    worst, count = worst_read(victim, 3)
    joined = negotiation_time(raw, server.address)
    assert worst <= WORST_READ, f"worst of {count} reads {worst * 1e3:.1f} ms under a {kind} flood"
    assert joined <= NEGOTIATE_WITHIN, f"a new client negotiated in {joined:.2f} s"


def test_no_address_holds_the_reply_buffer(
    big_root: Path, serve: Callable[..., RunningServer], raw: Raw, flood: Flood
) -> None:
    """Connections from several addresses ask for uncached reads and never read a reply.
    One address (12 connections) used to hold the whole server buffer: another client's
    cold 1 MiB read got no reply at all. Now each address holds at most its share (a
    quarter), and the last eighth is kept for an address that holds nothing, so even four
    attacking addresses together leave the victim its read. When they go, the memory
    goes too (RSS rose 296 MiB after such a round, and stayed)."""
    server = serve(
        big_root, "--max-server-buffer", str(128 << 20), "--max-connection-buffer", str(16 << 20)
    )
    image = big_root / "demo.erofs"
    size = image.stat().st_size
    data = image.read_bytes()
    victim = raw(server.address, timeout=10)
    victim.go()
    assert victim.read(0, 1 << 20) == (0, data[: 1 << 20])
    time.sleep(0.5)
    before = server.rss_mib()
    for rounds in range(2):  # memory must come back every time, not just once
        evict(image)
        seed = rounds * 100
        for attacker in range(2, 6):  # four addresses; the first with 12 connections
            for _ in range(12 if attacker == 2 else 3):
                seed += 1
                source = f"127.0.0.{attacker}"
                flood.start(
                    server.address, "hold", f"--size={size}", f"--source={source}", f"--seed={seed}"
                )
        time.sleep(1)  # they have asked for everything they can
        evict(image)
        offset = 100 << 20
        start = time.perf_counter()
        error, got = victim.read(offset, 1 << 20)
        took = time.perf_counter() - start
        assert (error, got == data[offset : offset + (1 << 20)]) == (0, True)
        assert took <= 1.0, f"the victim's cold 1 MiB read took {took:.2f} s"
        flood.stop()
        after = rss_back(server, before + RSS_SLACK_MIB)
        assert after <= before + RSS_SLACK_MIB, f"RSS {before:.0f} MiB before, {after:.0f} after"


def test_a_trickle_reader_cannot_keep_its_replies(
    big_root: Path, serve: Callable[..., RunningServer], raw: Raw, flood: Flood
) -> None:
    """A client that asks for 64 MiB of reads and reads 64 KiB of the replies every 1.8 s:
    a blocked write never waited 2 s, so --reply-timeout 2 never fired and it held 60 MiB
    as long as it liked. The timeout now counts whole replies: dropped within 2.5 s."""
    server = serve(big_root, "--reply-timeout", "2")
    image = big_root / "demo.erofs"
    evict(image)
    before = server.rss_mib()
    flood.start(server.address, "trickle", f"--size={image.stat().st_size}", "--source=127.0.0.2")
    end = time.monotonic() + 10
    while "(reply timeout)" not in server.log_text() and time.monotonic() < end:
        time.sleep(0.1)
    assert "client read no reply for 2 s (reply timeout)" in server.log_text()
    after = rss_back(server, before + RSS_SLACK_MIB)
    assert after <= before + RSS_SLACK_MIB, f"RSS {before:.0f} MiB before, {after:.0f} after"
    victim = raw(server.address)
    victim.go()
    assert victim.read(0, 1 << 20)[0] == 0


def test_list_does_not_refill_the_option_budget(
    images: Path, serve: Callable[..., RunningServer], raw: Raw
) -> None:
    """Every LIST used to add two options per export to the budget: one connection got
    2,100 options answered. Now only the first LIST frees two questions per export it
    names (nbdinfo --list asks those), and the budget only goes down."""
    server = serve(images)
    client = raw(server.address)
    client.start()
    answered = 0
    for _ in range(1000):  # bounded: the server hangs up after 64
        try:
            replies = client.option(client.hs.opt_list())
        except (ConnectionResetError, BrokenPipeError, AssertionError):
            break
        assert isinstance(replies[-1], OptionAck) and isinstance(replies[0], ServerEntry)
        answered += 1
    assert answered == 64
    wait_for_log(server, "more than 64 options before GO", 1)
    # the questions the first LIST freed: INFO and LIST_META_CONTEXT of each listed export
    lister = raw(server.address)
    lister.start()
    listed = [r.name for r in lister.option(lister.hs.opt_list()) if isinstance(r, ServerEntry)]
    for _ in range(63):
        lister.option(lister.hs.opt_structured_reply())
    for name in listed:
        assert isinstance(lister.option(lister.hs.opt_info(name))[-1], OptionAck)
        assert isinstance(lister.option(lister.hs.opt_list_meta_context(name))[-1], OptionAck)
    lister.send(lister.hs.opt_info(listed[0]))  # a third question: over the budget
    assert lister.closed_within(5)
    wait_for_log(server, "more than 64 options before GO", 2)


def test_a_full_table_makes_room_for_another_address(
    images: Path, serve: Callable[..., RunningServer], raw: Raw
) -> None:
    """Addresses holding idle connections used to lock everyone else out once the table
    was full (4 x 256 with the defaults). Now a newcomer's address with fewer connections
    than the busiest one gets in: the busiest address's least busy connection is closed.
    The busiest address itself is still refused."""
    server = serve(images, "--max-connections", "24", "--max-connections-per-client", "20")
    hoarders = [raw(server.address, source="127.0.0.2") for _ in range(16)]
    others = [raw(server.address, source="127.0.0.3") for _ in range(8)]
    for client in hoarders + others:
        client.go()
    busy = hoarders[0]
    assert busy.read(0, 4096)[0] == 0  # it has served a request: not the one to go
    for newcomer in range(3):  # each stays: the table is full again after each
        assert negotiation_time(raw, server.address, keep=True) <= NEGOTIATE_WITHIN, newcomer
    wait_for_log(server, "closed to make room", 3)
    assert "127.0.0.3" not in "".join(line for line in server.log if "closed to make room" in line)
    assert busy.read(0, 4096)[0] == 0
    refused = raw(server.address, source="127.0.0.2")
    assert refused.closed_within(5)  # the busiest address cannot make room for itself
    assert "connections already (limit)" in server.log_text()
