"""What storage hands a transport to send, and the one error either raises when the image
cannot be read. Both layers import this; neither imports the other."""

from __future__ import annotations

from typing import NamedTuple


class FileRange(NamedTuple):
    """Bytes of an open file, found in the page cache: a transport sends them with
    ``sendfile`` (or reads them a slice at a time to encrypt them)."""

    fd: int
    offset: int
    length: int


class ImageUnreadable(Exception):
    """The image failed to read, or ended early (it shrank under the server). Before a
    reply's header went out this is the request's ``NBD_EIO``; after it, the reply cannot
    be finished and the connection closes. ``server/transmit.py`` decides, in one place."""
