"""A libnbd client held open and driven line by line (run by Debian's python3, where
python3-libnbd lives): ``read OFFSET LENGTH`` answers ``ok SHA256`` or ``error ERRNO-NAME
MESSAGE``; ``size`` answers the export's size; ``quit`` closes."""

import hashlib
import sys

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if not words or words[0] == "quit":
        break
    if words[0] == "size":
        print("ok", h.get_size(), flush=True)
        continue
    try:
        data = h.pread(int(words[2]), int(words[1]))
        print("ok", hashlib.sha256(data).hexdigest(), flush=True)
    except nbd.Error as exc:
        print("error", exc.errno, exc.string.replace("\n", " "), flush=True)
h.shutdown()
