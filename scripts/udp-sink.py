#!/usr/bin/env python3
"""Count UDP datagrams arriving on 127.0.0.1:PORT; write "time arrived read dropped" to FILE
about every 0.2 s.

A benchmark peer for scripts/bench-pps.sh (the loopback destination of forwarded UDP, the
same for moat and passt). "arrived" is every datagram the kernel delivered to this socket:
the ones this process read plus the ones dropped because its receive buffer was full (the
socket's own drop count, /proc/net/udp), so a sink starved of CPU on a busy machine does
not lower the figure of the backend that sent them."""
import os
import socket
import sys
import time

port, out = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("127.0.0.1", port))
s.settimeout(0.2)
inode = str(os.fstat(s.fileno()).st_ino)


def dropped():
    """This socket's drops (the last column of its /proc/net/udp line)."""
    with open("/proc/net/udp") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 12 and fields[9] == inode:
                return int(fields[-1])
    return 0


buf = bytearray(2048)
n, last = 0, 0.0
while True:
    try:
        for _ in range(256):
            s.recv_into(buf)
            n += 1
    except socket.timeout:
        pass
    if time.time() - last > 0.2:
        d = dropped()
        with open(out + ".tmp", "w") as f:
            f.write("%f %d %d %d\n" % (time.time(), n + d, n, d))
        os.replace(out + ".tmp", out)
        last = time.time()
