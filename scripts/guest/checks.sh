#!/bin/sh
# Guest-side checks (busybox sh), one line each on the serial console:
#   MOAT-CHECK <name> <expected: pass|fail> <observed: ok|blocked|unsent> <detail>
# "pass" means the attempt must work, "fail" means moat must block it. "unsent" replaces
# "blocked" when a forbidden attempt never put a frame on eth0 (it failed inside the guest,
# which proves nothing about moat): the runner counts it as a mismatch. The detail starts
# with the eth0 frame counts of the attempt (tx+N rx+M).
# Then MOAT-DONE (printed by /init). Parameters from the kernel command line:
# moat.expect_ip= (the policy address), moat.gateway=, moat.egress=PORT (optional).
# Every attempt is short (2-3 s): the guest runs under TCG.
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
expect_ip=$(arg moat.expect_ip)
gw=$(arg moat.gateway)
echo "MOAT-CHECKS-START $(cut -d' ' -f1 /proc/uptime)"

frames() { cat "/sys/class/net/eth0/statistics/$1" 2>/dev/null || echo 0; }

check() { # name expected command...
  name=$1; expected=$2; shift 2
  tx0=$(frames tx_packets); rx0=$(frames rx_packets)
  if "$@" >/tmp/out 2>&1; then observed=ok; else observed=blocked; fi
  tx=$(($(frames tx_packets) - tx0)); rx=$(($(frames rx_packets) - rx0))
  if [ "$observed" = blocked ] && [ "$expected" = fail ] && [ "$tx" = 0 ]; then observed=unsent; fi
  detail=$(tr '\n' ' ' </tmp/out | cut -c1-60)
  echo "MOAT-CHECK $name $expected $observed tx+$tx rx+$rx ${detail:--}"
}

tcp() { # host port: succeeds only if the TCP handshake completes (nc runs `true` once
  # connected; a plain `timeout 3 nc` would also fail on an open port that stays silent)
  timeout 6 nc -w 3 "$1" "$2" -e true
}

# Another VM on the same link, reached without the gateway: a frame with its own
# destination MAC (nothing may bridge it). 10.0.0.3 would be the /30's broadcast address.
l2_peer=10.0.0.9 l2_mac=52:54:00:12:34:99
l2_ping() {
  ip route replace "$l2_peer/32" dev eth0 &&
    arp -i eth0 -s "$l2_peer" "$l2_mac" &&
    ping -c 1 -W 2 "$l2_peer"
}

fetch() { # url: succeeds only if the body is exactly "ok" (busybox wget -T crashes: use timeout)
  body=$(timeout 10 wget -q -O - "$1" 2>/dev/null) && [ "$body" = ok ]
}

fetch_big() { # url: the origin's 64 KiB /big body, byte for byte (rebuilt here with awk)
  timeout 20 wget -q -O /tmp/big "$1" 2>/dev/null || return 1
  want=$(awk 'BEGIN { for (i = 0; i < 4096; i++) printf "moat-line-%05d\n", i }' | md5sum | cut -d' ' -f1)
  got=$(md5sum </tmp/big | cut -d' ' -f1)
  [ "$(wc -c </tmp/big)" -eq 65536 ] && [ "$got" = "$want" ] || { echo "$(wc -c </tmp/big) bytes, md5 $got"; return 1; }
}

fetch_via() { # proxy url: the same through an explicit HTTP proxy
  body=$(http_proxy="$1" timeout 10 wget -q -O - "$2" 2>/dev/null) && [ "$body" = ok ]
}

smuggle() { # host: HTTP to a public address whose Host header says $1; "works" if anything
  # at all comes back (moat must reset it before a proxy is asked)
  resp=$(printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$1" |
    timeout 6 nc -w 3 198.51.100.1 80 2>/dev/null)
  [ -n "$resp" ]
}

fetch_any_via() { # proxy url: works if the request gets any 2xx through the proxy
  http_proxy="$1" timeout 10 wget -q -O /dev/null "$2" 2>/dev/null
}

connect_via() { # gateway host:port: works if the explicit proxy port opens the tunnel
  resp=$(printf 'CONNECT %s HTTP/1.1\r\n\r\n' "$2" | timeout 6 nc -w 3 "$1" 3128 2>/dev/null)
  case "$resp" in "HTTP/1."?" 200"*) return 0 ;; *) return 1 ;; esac
}

refused_403() { # gateway host:port: moat itself answers 403 with the reason
  resp=$(printf 'CONNECT %s HTTP/1.1\r\n\r\n' "$2" | timeout 6 nc -w 3 "$1" 3128 2>/dev/null)
  case "$resp" in "HTTP/1.1 403 Forbidden"*"moat: reserved_destination"*) return 0 ;; *) echo "$resp"; return 1 ;; esac
}

ip link set eth0 up
check dhcp pass udhcpc -i eth0 -n -q -t 5 -T 2
check dhcp-address pass test "$(cat /tmp/dhcp-ip 2>/dev/null)" = "$expect_ip"
check dhcp-router pass test "$(cat /tmp/dhcp-router 2>/dev/null)" = "$gw"
check ping-gateway pass ping -c 2 -W 2 "$gw"
check arp-gateway pass arping -c 1 -w 2 -I eth0 "$gw"
check ping-other-vm fail ping -c 1 -W 2 10.0.0.5
check ping-other-vm-24 fail ping -c 1 -W 2 10.0.0.77
check tcp-other-vm-22 fail tcp 10.0.0.5 22
check l2-ping-other-vm fail l2_ping
check l2-tcp-other-vm-22 fail tcp "$l2_peer" 22
arp -i eth0 -d "$l2_peer" 2>/dev/null; ip route del "$l2_peer/32" dev eth0 2>/dev/null
check arp-other-vm fail arping -c 1 -w 2 -I eth0 10.0.0.5
check ping-internet fail ping -c 1 -W 2 203.0.113.1
check tcp-internet-22 fail tcp 203.0.113.1 22
check http-internet fail fetch http://198.51.100.1/
check tcp-gateway-22 fail tcp "$gw" 22
check tcp-gateway-2375 fail tcp "$gw" 2375

# The guest-side canary (scripts/canary-guest.sh): its rows are checked like these. Exit 1
# means it ran and its rows show what failed; anything else (aborted, killed) is a failed
# row of its own, never a pass with rows missing.
/bin/canary-guest.sh eth0 || [ $? = 1 ] || echo 'MOAT-CHECK canary-aborted pass blocked -'

# A hostile DNS-over-TCP client (moat.dnsflood=BYTES): pipelines queries to the gateway and
# never reads the answers; the host watches moat's memory meanwhile (qemu-e2e.sh --dns-flood).
flood=$(arg moat.dnsflood)
if [ -n "$flood" ] && [ -x /bin/dnsflood ]; then
  echo "MOAT-DNSFLOOD-START $(cut -d' ' -f1 /proc/uptime)"
  echo "MOAT-DNSFLOOD $(/bin/dnsflood "$gw" "$flood" 20)"
fi

# Egress, when the test gives an origin port (moat.egress=PORT): names resolve only if
# allowed, flows go through the proxy, and a host peer reaches the guest through a forward.
egress=$(arg moat.egress)
if [ -n "$egress" ]; then
  check dns-allowed pass nslookup -type=a localhost "$gw"
  check dns-denied fail nslookup -type=a evil.test "$gw"
  check wget-transparent pass fetch "http://localhost:$egress/"
  check wget-64k-body pass fetch_big "http://localhost:$egress/big"
  check wget-explicit-proxy pass fetch_via "http://$gw:3128" "http://localhost:$egress/"
  check wget-ip-literal fail fetch "http://198.51.100.1:$egress/"
  # The gate, as a hostile guest tries it (the policy allows any name on port 80): a public
  # address whose Host header names loopback, and explicit-proxy requests for loopback and
  # the metadata service. moat resets or answers 403; nothing may come back from beyond it.
  check smuggle-host-127.0.0.1 fail smuggle "127.0.0.1"
  check smuggle-host-0x7f000001 fail smuggle "0x7f000001"
  check smuggle-host-localhost fail smuggle "localhost"
  check smuggle-host-metadata fail smuggle "169.254.169.254"
  check explicit-metadata fail fetch_any_via "http://$gw:3128" "http://169.254.169.254/"
  check explicit-loopback-decimal fail fetch_any_via "http://$gw:3128" "http://2130706433/"
  check explicit-connect-ssh fail connect_via "$gw" "127.0.0.1:22"
  check explicit-connect-refused-403 pass refused_403 "$gw" "localhost:22"
  mkdir -p /www && echo guest-page > /www/index.html
  httpd -f -v -p 3000 -h /www 2>/tmp/httpd.log &
  echo MOAT-HTTPD-UP
  # busybox httpd -v logs each request with the peer address: it must be the gateway.
  seen() { for _ in $(seq 40); do grep -qF "$gw]:" /tmp/httpd.log 2>/dev/null && return 0; sleep 0.5; done; cat /tmp/httpd.log; return 1; }
  check forward-httpd pass seen
fi
