#!/usr/bin/env python3
"""Write a pcap of DNS queries from the guest to the gateway, every frame exactly SIZE bytes.

usage: dns-pcap.py SIZE FILE [COUNT]

A benchmark input for scripts/bench-pps.sh: dpdk-testpmd replays it (net_pcap, infinite_rx)
into moat so the answer path gets real queries (one question each: "moat." A IN, with
distinct IDs and source ports), not the zero payload of testpmd's txonly mode. Frames over
64 bytes carry an EDNS0 OPT record with a padding option (RFC 7830) that fills them to SIZE.
Addresses: guest 52:54:00:12:34:56 / 10.0.0.2, gateway 02:6d:6f:61:74:01 / 10.0.0.1."""
import struct
import sys

GUEST_MAC = bytes.fromhex("525400123456")
GW_MAC = bytes.fromhex("026d6f617401")
GUEST_IP = bytes([10, 0, 0, 2])
GW_IP = bytes([10, 0, 0, 1])
BASE = 14 + 20 + 8 + 12 + 6 + 4  # one question for "moat." A IN: a 64-byte frame
OPT = 11 + 4  # the OPT record and its padding option's header


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame(size, i):
    qid, sport = (0x1000 + i) & 0xFFFF, 40000 + i
    question = b"\x04moat\x00" + struct.pack("!HH", 1, 1)
    if size == BASE:
        dns = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question
    elif size >= BASE + OPT:
        pad = size - BASE - OPT
        opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 4 + pad) + struct.pack("!HH", 12, pad)
        dns = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1) + question + opt + bytes(pad)
    else:
        sys.exit("dns-pcap: SIZE must be %d or at least %d" % (BASE, BASE + OPT))
    udp_len = 8 + len(dns)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, i & 0xFFFF, 0, 64, 17, 0, GUEST_IP, GW_IP)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    pseudo = GUEST_IP + GW_IP + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, 53, udp_len, 0) + dns
    csum = checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    out = GW_MAC + GUEST_MAC + b"\x08\x00" + ip + udp
    assert len(out) == size, (len(out), size)
    return out


def main():
    size, path = int(sys.argv[1]), sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(count):
            data = frame(size, i)
            f.write(struct.pack("<IIII", 0, i, len(data), len(data)))
            f.write(data)


main()
