#!/bin/sh
# moat canary, guest side: the forbidden attempts of `moat canary`, as a busybox sh script
# that runs inside any real guest behind moat (after DHCP). Every attempt must fail; two
# controls (ping the gateway, ARP for it) must work, or the failures prove nothing.
# Output: one line per attempt, then "N passed, M failed" and, only when every attempt ran,
# the row "MOAT-CHECK canary-finished pass ok": a runner that does not see it knows the
# canary was aborted (no address, killed, a shell error) and must fail, not pass with
# missing rows. Exit 1 if any attempt went the wrong way, 2 if it could not start.
#   MOAT-CHECK canary-<name> <expected: pass|fail> <observed: ok|blocked|unsent> <detail>
# "unsent": a forbidden attempt that never put a frame on the wire proves nothing (mismatch).
# Usage: canary-guest.sh [IFACE] (default eth0). Targets: documentation ranges only.
# Without an address on IFACE it first asks for one by DHCP (as the canary VM boots it
# straight from /init: scripts/canary-vm.sh).
ifc=${1:-eth0}
if ! ip -4 addr show dev "$ifc" 2>/dev/null | grep -q 'inet '; then
  ip link set "$ifc" up
  udhcpc -i "$ifc" -n -q -t 5 -T 2 >/dev/null 2>&1
fi
gw=$(ip route | sed -n 's/^default via \([0-9.]*\).*/\1/p' | head -n 1)
me=$(ip -4 addr show dev "$ifc" | sed -n 's/.*inet \([0-9.]*\)\/.*/\1/p' | head -n 1)
[ -n "$gw" ] && [ -n "$me" ] || { echo "canary-guest: no address or default route on $ifc"; echo "MOAT-CHECK canary-aborted pass blocked no address or default route on $ifc"; exit 2; }
base=${me%.*}
near="$base.66"; [ "$near" = "$me" ] || [ "$near" = "$gw" ] && near="$base.67"
passed=0 failed=0

frames() { cat "/sys/class/net/$ifc/statistics/$1" 2>/dev/null || echo 0; }
attempt() { # name expected command...
  name=$1; expected=$2; shift 2
  tx0=$(frames tx_packets)
  if "$@" >/tmp/canary.out 2>&1; then observed=ok; else observed=blocked; fi
  tx=$(($(frames tx_packets) - tx0))
  [ "$observed" = blocked ] && [ "$expected" = fail ] && [ "$tx" = 0 ] && observed=unsent
  want=$([ "$expected" = pass ] && echo ok || echo blocked)
  if [ "$observed" = "$want" ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
  echo "MOAT-CHECK canary-$name $expected $observed tx+$tx $(tr '\n' ' ' </tmp/canary.out | cut -c1-50)"
}
tcp() { timeout 6 nc -w 3 "$1" "$2" -e true; }
dns_elsewhere() { timeout 6 nslookup -type=a example.com "$1"; }
# UDP to the internet on a port no rule allows (a DNS-shaped datagram to port 9); succeeds
# only if something answers.
udp9() { timeout 6 nslookup -type=a example.com "$1:9"; }
spoofed_ip() { ip addr add "$base.250/32" dev "$ifc" && ping -c 1 -W 2 -I "$base.250" "$gw"; r=$?; ip addr del "$base.250/32" dev "$ifc"; return $r; }
spoofed_mac() {
  real=$(cat "/sys/class/net/$ifc/address")
  ip link set "$ifc" address 52:54:00:de:ad:01 && ping -c 1 -W 2 "$gw"; r=$?
  ip link set "$ifc" address "$real"; return $r
}
# A name smuggled in the first bytes: HTTP to a documentation address whose Host header
# names loopback or the metadata service. moat must reset it before any proxy is asked;
# "works" if anything at all comes back. (A policy that names loopback or 169.254.169.254 by
# CIDR on that port allows this by design.)
smuggle() { # host port
  resp=$(printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$1" |
    timeout 6 nc -w 3 192.0.2.10 "$2" 2>/dev/null)
  [ -n "$resp" ]
}
# A request on an explicit-proxy port of the gateway (3128 and 8080 tried): "works" only if a
# tunnel opens (moat answers 403 to a forbidden target; a closed port refuses).
explicit_connect() { # port target
  resp=$(printf 'CONNECT %s HTTP/1.1\r\n\r\n' "$2" | timeout 6 nc -w 3 "$gw" "$1" 2>/dev/null)
  case "$resp" in "HTTP/1."?" 200"*) return 0 ;; *) return 1 ;; esac
}
ipv6_ping() { ip -6 addr add fd00:6d6f:6174::2/64 dev "$ifc" 2>/dev/null; ping -6 -c 1 -W 2 fd00:6d6f:6174::1; }

attempt control-ping-gateway pass ping -c 1 -W 2 "$gw"
attempt control-arp-gateway pass arping -c 1 -w 2 -I "$ifc" "$gw"
attempt ping-vm-same-24 fail ping -c 1 -W 2 "$near"
attempt ping-vm-other-subnet fail ping -c 1 -W 2 10.99.0.1
attempt tcp-vm-same-24 fail tcp "$near" 22
attempt tcp-vm-other-subnet fail tcp 10.99.0.1 22
for port in 22 2375 2376 10250 8080; do attempt "tcp-gateway-$port" fail tcp "$gw" "$port"; done
attempt tcp-metadata fail tcp 169.254.169.254 80
attempt dns-not-allowlisted fail nslookup -type=a canary-forbidden.invalid "$gw"
attempt dns-other-resolver fail dns_elsewhere 198.51.100.53
attempt tcp-internet-literal fail tcp 192.0.2.10 9
attempt udp-internet-literal fail udp9 192.0.2.10
for port in 80 443; do
  attempt "smuggle-host-loopback-$port" fail smuggle 127.0.0.1 "$port"
  attempt "smuggle-host-hex-loopback-$port" fail smuggle 0x7f000001 "$port"
  attempt "smuggle-host-localhost-$port" fail smuggle localhost "$port"
  attempt "smuggle-host-metadata-$port" fail smuggle 169.254.169.254 "$port"
done
for port in 3128 8080; do
  attempt "explicit-$port-loopback-ssh" fail explicit_connect "$port" 127.0.0.1:22
  attempt "explicit-$port-metadata" fail explicit_connect "$port" 169.254.169.254:80
done
attempt arp-other-address fail arping -c 1 -w 2 -I "$ifc" "$near"
# Claim the gateway's address; moat must keep answering for it with its own MAC.
attempt control-gateway-mac-after-arp-spoof pass sh -c "arping -U -c 1 -I $ifc -s $gw $gw >/dev/null 2>&1; arping -c 1 -w 2 -I $ifc $gw | grep -qi 02:6d:6f:61:74:01"
attempt spoofed-source-ip fail spoofed_ip
attempt spoofed-source-mac fail spoofed_mac
attempt ipv6 fail ipv6_ping
attempt control-gateway-after-spoofing pass ping -c 1 -W 2 "$gw"
echo "$passed passed, $failed failed"
echo "MOAT-CHECK canary-finished pass ok $passed passed, $failed failed"
[ "$failed" = 0 ]
