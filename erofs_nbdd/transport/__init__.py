"""Byte streams to a peer: plaintext, kernel TLS and TLS in this process, and the addresses
and certificates they start from."""
