"""The command line, in process."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from erofs_nbdd.cli import ExitStatus, main
from erofs_nbdd.transport.listen import ListenError, ListenSpec, parse_listen

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        (":10809", ListenSpec("tcp", None, 10809)),
        ("127.0.0.1:0", ListenSpec("tcp", "127.0.0.1", 0)),
        ("localhost", ListenSpec("tcp", "localhost", 10809)),
        ("[::1]:1234", ListenSpec("tcp", "::1", 1234)),
        ("[::]", ListenSpec("tcp", "::", 10809)),
        ("unix:/run/x.sock", ListenSpec("unix", path="/run/x.sock")),
    ],
)
def test_parse_listen(text: str, spec: ListenSpec) -> None:
    assert parse_listen(text) == spec


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("::1:80", r"\[ADDR\]:PORT"),
        ("[::1]80", r"\[ADDR\]:PORT"),
        ("host:http", "must be a number"),
        ("host:70000", "0..65535"),
        ("unix:", "needs a path"),
    ],
)
def test_parse_listen_errors(text: str, match: str) -> None:
    with pytest.raises(ListenError, match=match):
        parse_listen(text)


def test_bad_listen_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path), "--listen", "::1:80"]) == ExitStatus.USAGE
    assert "[ADDR]:PORT" in capsys.readouterr().err


def test_missing_directory_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path / "nope")]) == ExitStatus.USAGE
    assert "is not a directory" in capsys.readouterr().err


def test_port_in_use_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["serve", str(tmp_path), "--listen", f"127.0.0.1:{port}"])
    assert status == ExitStatus.ERROR
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])
    assert excinfo.value.code == 0
    assert "erofs-nbdd 0.1.0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--default-export" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-connections", "0"], "--max-connections must be above 0, not 0"),
        (["--max-in-flight", "0"], "--max-in-flight must be above 0"),
        (["--idle-timeout", "-1"], "--idle-timeout must be 0 or more, not -1"),
        (["--max-server-buffer", "0"], "--max-server-buffer must be above 0"),
    ],
)
def test_bad_limits_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["serve", str(tmp_path), *args]) == ExitStatus.USAGE
    assert message in capsys.readouterr().err


def test_limits_reach_the_config(tmp_path: Path) -> None:
    from erofs_nbdd.cli import _config, build_parser

    args = build_parser().parse_args(
        [
            "serve",
            str(tmp_path),
            "--idle-timeout",
            "30",
            "--max-connections-per-client",
            "0",
            "--reply-timeout",
            "5",
            "--max-connection-buffer",
            "1048576",
            "--max-client-buffer",
            "4194304",
        ]
    )
    limits = _config(args).limits
    assert limits.max_client_buffer == 4 << 20
    assert (limits.idle_timeout, limits.max_connections_per_client) == (30, 0)
    assert (limits.reply_timeout, limits.max_connection_buffer) == (5, 1 << 20)
    assert limits.max_connections == 1024  # untouched defaults stay


@pytest.mark.parametrize(("flag", "io_uring"), [([], True), (["--io-uring", "off"], False)])
def test_io_uring_reaches_the_config(tmp_path: Path, flag: list[str], io_uring: bool) -> None:
    from erofs_nbdd.cli import _config, build_parser

    assert _config(build_parser().parse_args(["serve", str(tmp_path), *flag])).io_uring is io_uring


def test_busy_poll_and_workers_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path), "--busy-poll", "-1"]) == ExitStatus.USAGE
    assert "--busy-poll takes 0..10000 microseconds" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--workers", "0"]) == ExitStatus.USAGE
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_malloc_tuning_applies_on_glibc() -> None:
    from erofs_nbdd.memory import tune_malloc

    assert tune_malloc() is True
