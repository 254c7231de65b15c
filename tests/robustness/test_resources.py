"""What a connection holds is given back however it ends: floods of clients that select an
export and reset the connection before the reply, against the server process. Its open
descriptors (``/proc/PID/fd``) and resident memory return to where they were."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from ..interop.conftest import wait_for_log
from .conftest import assert_serves

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..interop.conftest import RunningServer
    from .conftest import RawClient

FLOOD = 200


def descriptors(server: RunningServer) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


@pytest.mark.parametrize("option", ["go", "export_name"])
def test_select_then_reset_floods_leave_nothing_open(
    server: RunningServer, raw: Callable[..., RawClient], option: str
) -> None:
    """Each client sends its flags and GO (or EXPORT_NAME) for a real export and resets
    the connection without reading the reply: the server opened the image for it, and must
    close it whether or not its reply could still be sent (it leaked one descriptor per
    client before)."""
    assert_serves(server)  # warm: io_uring's ring and the first image opened once
    fds, rss = descriptors(server), server.rss_mib()
    ended = server.log_text().count(" ended=")
    for _ in range(FLOOD):
        client = raw(server.address)
        client.start()
        if option == "go":
            client.send(client.hs.opt_go("demo"))
        else:
            client.send(client.hs.opt_export_name("demo"))
        client.close(reset=True)
    wait_for_log(server, " ended=", ended + FLOOD)
    assert descriptors(server) == fds, os.listdir(f"/proc/{server.process.pid}/fd")
    assert server.rss_mib() < rss + 16
