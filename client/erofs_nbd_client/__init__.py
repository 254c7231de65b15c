"""erofs-nbd-attach: negotiate with an NBD server and hand the connection to the kernel."""

__version__ = "0.1.0"
