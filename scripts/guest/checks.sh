#!/bin/sh
# Guest-side checks, one line each on the serial console:
#   MOAT-CHECK <name> <expected: pass|fail> <observed: ok|blocked> <detail>
# "pass" means the attempt must work, "fail" means moat must block it.
# Expected values come from the kernel command line: moat.expect_ip=, moat.gateway=.
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
expect_ip=$(arg moat.expect_ip)
gw=$(arg moat.gateway)

check() { # name expected command...
  name=$1; expected=$2; shift 2
  if "$@" >/tmp/out 2>&1; then observed=ok; else observed=blocked; fi
  detail=$(tr '\n' ' ' </tmp/out | cut -c1-60)
  echo "MOAT-CHECK $name $expected $observed ${detail:--}"
}

tcp() { # host port: succeeds only if a TCP connection opens
  timeout 3 nc "$1" "$2" </dev/null
}

fetch() { # url: succeeds only if the body is exactly "ok" (busybox wget -T crashes: use timeout)
  body=$(timeout 10 wget -q -O - "$1" 2>/dev/null) && [ "$body" = ok ]
}

fetch_via() { # proxy url: the same through an explicit HTTP proxy
  body=$(http_proxy="$1" timeout 10 wget -q -O - "$2" 2>/dev/null) && [ "$body" = ok ]
}

ip link set eth0 up
check dhcp pass udhcpc -i eth0 -n -q -t 4 -T 2
got=$(cat /tmp/dhcp-ip 2>/dev/null)
check dhcp-address pass test "$got" = "$expect_ip"
check dhcp-router pass test "$(cat /tmp/dhcp-router 2>/dev/null)" = "$gw"
check ping-gateway pass ping -c 2 -W 2 "$gw"
check ping-other-vm fail ping -c 1 -W 2 10.0.0.5
check ping-other-vm-24 fail ping -c 1 -W 2 10.0.0.77
check tcp-other-vm-22 fail tcp 10.0.0.5 22
check ping-internet fail ping -c 1 -W 2 203.0.113.1
check tcp-internet-22 fail tcp 203.0.113.1 22
check http-internet fail fetch http://198.51.100.1/
check tcp-gateway-22 fail tcp "$gw" 22
check tcp-gateway-2375 fail tcp "$gw" 2375
check arp-other-vm fail arping -c 1 -w 2 -I eth0 10.0.0.5
check arp-gateway pass arping -c 1 -w 2 -I eth0 "$gw"

# Egress, when the test gives an origin port (moat.egress=PORT): names resolve only if
# allowed, flows go through the proxy, and a host peer reaches the guest through a forward.
egress=$(arg moat.egress)
if [ -n "$egress" ]; then
  check dns-allowed pass nslookup -type=a localhost "$gw"
  check dns-denied fail nslookup -type=a evil.test "$gw"
  check wget-transparent pass fetch "http://localhost:$egress/"
  check wget-explicit-proxy pass fetch_via "http://$gw:3128" "http://localhost:$egress/"
  check wget-ip-literal fail fetch "http://198.51.100.1:$egress/"
  mkdir -p /www && echo guest-page > /www/index.html
  httpd -f -v -p 3000 -h /www 2>/tmp/httpd.log &
  echo MOAT-HTTPD-UP
  # busybox httpd -v logs each request with the peer address: it must be the gateway.
  seen() { for _ in $(seq 40); do grep -qF "$gw]:" /tmp/httpd.log 2>/dev/null && return 0; sleep 0.5; done; cat /tmp/httpd.log; return 1; }
  check forward-httpd pass seen
fi
