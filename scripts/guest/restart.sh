#!/bin/sh
# Guest side of the "moat killed and restarted" fault test: with QEMU's reconnecting
# chardev, the guest's network must come back without a reboot. The host kills moat (SIGKILL)
# when it sees MOAT-READY-FOR-KILL and starts a new one on the same socket.
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
gw=$(arg moat.gateway)
echo "MOAT-CHECKS-START $(cut -d' ' -f1 /proc/uptime)"
ip link set eth0 up
udhcpc -i eth0 -n -q -t 5 -T 2 >/dev/null 2>&1
if ping -c 1 -W 2 "$gw" >/dev/null 2>&1; then first=ok; else first=blocked; fi
echo "MOAT-CHECK ping-before-kill pass $first -"
echo MOAT-READY-FOR-KILL
lost=blocked back=blocked
for _ in $(seq 120); do
  if ping -c 1 -W 1 "$gw" >/dev/null 2>&1; then
    [ "$lost" = ok ] && { back=ok; break; }
  else
    lost=ok
  fi
  sleep 0.5
done
echo "MOAT-CHECK outage-seen pass $lost -"
echo "MOAT-CHECK ping-after-restart pass $back no-reboot"
