#!/usr/bin/env python3
"""Count UDP datagrams on 127.0.0.1:PORT; write "time count" to FILE about every 0.2 s.

A benchmark peer for scripts/bench-pps.sh (the loopback destination of forwarded UDP)."""
import os
import socket
import sys
import time

port, out = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("127.0.0.1", port))
s.settimeout(0.2)
n, last = 0, 0.0
while True:
    try:
        for _ in range(256):
            s.recv(2048)
            n += 1
    except socket.timeout:
        pass
    if time.time() - last > 0.2:
        with open(out + ".tmp", "w") as f:
            f.write("%f %d\n" % (time.time(), n))
        os.replace(out + ".tmp", out)
        last = time.time()
