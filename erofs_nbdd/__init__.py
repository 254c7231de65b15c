"""erofs-nbdd: serve a directory of EROFS images over NBD."""

__version__ = "0.1.0"
