"""The server: listeners, connections, the transmission phase, worker processes."""

from .listener import Server, bind_listen, serve

__all__ = ["Server", "bind_listen", "serve"]
