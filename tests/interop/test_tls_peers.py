"""TLS against real peers, with certificates made by `erofs-nbdd certs`."""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
import trio

from erofs_nbd_client.negotiate import NegotiationError, negotiate
from erofs_nbdd.transport.contexts import client_context
from erofs_nbdd.transport.tls import TLSTransport

from ..conftest import require_tool
from .conftest import RunningServer, run, start_server_process, stop_server_process

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def certs(made_certs: Path) -> Path:
    return made_certs


MODES = {
    "on": ["--tls", "on"],
    "require": ["--tls", "require"],
    "verify": ["--tls", "require", "--tls-verify-peer"],
}


@pytest.fixture(scope="module", params=sorted(MODES))
def tls_server(
    request: pytest.FixtureRequest, images: Path, certs: Path
) -> Iterator[tuple[str, RunningServer]]:
    server = start_server_process(images, *MODES[request.param], "--tls-certificates", str(certs))
    yield request.param, server
    assert stop_server_process(server) == 0
    assert "Traceback" not in server.log_text()


def nbds(server: RunningServer, export: str, client_dir: Path) -> str:
    return f"nbds://{server.address}/{export}?tls-certificates={client_dir}"


@pytest.mark.parametrize("who", ["alice", "anonymous"])
def test_nbdinfo_over_tls(tls_server: tuple[str, RunningServer], certs: Path, who: str) -> None:
    mode, server = tls_server
    uri = nbds(server, "", certs / "clients" / who)
    result = run(require_tool("nbdinfo"), "--list", "--json", uri, check=False)
    if mode == "verify" and who == "anonymous":
        assert result.returncode != 0  # refused at the TLS layer
        assert "export-name" not in result.stdout
        return
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["TLS"] is True
    assert sorted(e["export-name"] for e in listing["exports"]) == ["alias", "demo", "team/app-v2"]


def test_plaintext_nbdinfo(tls_server: tuple[str, RunningServer]) -> None:
    mode, server = tls_server
    result = run(require_tool("nbdinfo"), "--json", server.uri("demo"), check=False)
    if mode == "on":
        assert result.returncode == 0
        assert json.loads(result.stdout)["TLS"] is False
    else:
        assert result.returncode != 0
        # libnbd 1.14 reports NBD_REP_ERR_TLS_REQD as ENOTSUP
        assert "Operation not supported for export: demo" in result.stderr


def test_nbdcopy_over_tls(tls_server: tuple[str, RunningServer], certs: Path) -> None:
    _, server = tls_server
    out = server.root.parent / "tls-copy"
    run(require_tool("nbdcopy"), nbds(server, "team/app-v2", certs / "clients/alice"), str(out))
    want = hashlib.sha256((server.root / "team/app-v2.erofs").read_bytes()).hexdigest()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == want


OPENSSL_CONF = """openssl_conf = conf
[conf]
ssl_conf = ssl
[ssl]
system_default = tls
[tls]
Ciphersuites = {suite}
"""


@pytest.mark.parametrize(
    ("suite", "seal"),
    [
        ("TLS_AES_128_GCM_SHA256", "auto"),
        ("TLS_AES_256_GCM_SHA384", "auto"),
        ("TLS_CHACHA20_POLY1305_SHA256", "auto"),
        ("TLS_AES_256_GCM_SHA384", "openssl"),
    ],
)
def test_nbdcopy_over_each_tls13_suite(
    images: Path, certs: Path, tmp_path: Path, suite: str, seal: str
) -> None:
    """Each TLS 1.3 suite OpenSSL offers by default (chosen here by an OpenSSL config in
    the server's environment), with records sealed by the server itself and, for one, by
    OpenSSL: GnuTLS (nbdcopy) opens every record and the copy matches the image."""
    conf = tmp_path / "openssl.cnf"
    conf.write_text(OPENSSL_CONF.format(suite=suite))
    server = start_server_process(
        images,
        "--tls",
        "require",
        "--tls-certificates",
        str(certs),
        "--tls-kernel",
        "off",
        "--tls-seal",
        seal,
        env={"OPENSSL_CONF": str(conf)},
    )
    try:
        out = tmp_path / "copy"
        run(require_tool("nbdcopy"), nbds(server, "team/app-v2", certs / "clients/alice"), str(out))
    finally:
        assert stop_server_process(server) == 0
    want = hashlib.sha256((server.root / "team/app-v2.erofs").read_bytes()).hexdigest()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == want
    sealed = f"tls=TLSv1.3/{suite}+sealed"
    assert (sealed in server.log_text()) == (seal == "auto"), server.log_text()
    assert ("records of replies are sealed by erofs-nbdd" in server.log_text()) == (seal == "auto")
    assert f"tls=TLSv1.3/{suite}" in server.log_text()


def test_qemu_img_info_over_tls(tls_server: tuple[str, RunningServer], certs: Path) -> None:
    _, server = tls_server
    host, _, port = server.address.rpartition(":")
    result = run(
        require_tool("qemu-img"),
        "info",
        "--output=json",
        "--object",
        f"tls-creds-x509,id=tls0,dir={certs / 'clients/alice'},endpoint=client",
        "--image-opts",
        f"driver=nbd,host={host},port={port},export=demo,tls-creds=tls0",
    )
    assert json.loads(result.stdout)["virtual-size"] == (server.root / "demo.erofs").stat().st_size


@pytest.fixture(params=[[], ["--tls-verify-peer"]], ids=["nbdkit-require", "nbdkit-verify"])
def nbdkit_tls(
    request: pytest.FixtureRequest, images: Path, certs: Path, tmp_path: Path
) -> Iterator[Path]:
    sock = tmp_path / "nbdkit.sock"
    process = subprocess.Popen(
        [
            require_tool("nbdkit"),
            "-f",
            "-r",
            "-U",
            str(sock),
            "--tls=require",
            f"--tls-certificates={certs}",
            *request.param,
            "file",
            str(images / "demo.erofs"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.05)
    yield sock
    process.terminate()
    process.communicate(timeout=10)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_our_client_against_nbdkit_tls(
    nbdkit_tls: Path, certs: Path, images: Path, version: ssl.TLSVersion
) -> None:
    data = (images / "demo.erofs").read_bytes()
    ctx = client_context(certs / "clients/alice")
    ctx.maximum_version = version
    async with await trio.open_unix_socket(str(nbdkit_tls)) as stream:
        details, session = await negotiate(stream, "", tls=ctx, server_hostname="localhost")
        assert details.size == len(data)
        assert await session.pread(4096, 65536) == data[4096 : 4096 + 65536]
        assert isinstance(session.stream, TLSTransport)
        assert session.stream.version() == version.name.replace("v1_", "v1.")
        await session.disconnect()


async def test_our_client_refuses_plaintext_from_nbdkit(nbdkit_tls: Path, certs: Path) -> None:
    """A client that does not ask for TLS gets ERR_TLS_REQD from nbdkit --tls=require."""
    async with await trio.open_unix_socket(str(nbdkit_tls)) as stream:
        with pytest.raises(NegotiationError, match="TLS_REQD"):
            await negotiate(stream, "")
