#!/usr/bin/env bash
# Every performance figure of moat in one run, each against a peer measured in the same run:
#   scripts/bench-pps.sh             packet rate (dpdk-testpmd txonly) vs DPDK's vhost PMD
#   cargo bench --bench egress_tcp   TCP through moat, and through passt when PASST=path is set
#   cargo bench --bench verdict      parse + verdict ns/frame vs etherparse's bare parse
#   cargo bench --bench footprint    RSS and idle CPU vs the issue's targets
#   cargo bench --bench many_flows   one flow's RR with thousands of other flows open vs none
# then ONE summary table (peer, figure, moat, peer value, ratio) in target/bench/summary.txt.
# Each step's full output is in target/bench/<step>.log.
#
# MOAT_BENCH_QUICK=1: a smoke run (3 s per packet-rate case, 32 MiB / 50 connections, short
# criterion runs, 3 s idle, 1000 flows, 10 moats).
set -uo pipefail
cd "$(dirname "$0")/.."

out=target/bench
mkdir -p "$out"
quick=${MOAT_BENCH_QUICK:-0}
if [ "$quick" != 0 ] && [ -n "$quick" ]; then
  export MOAT_BENCH_QUICK=1
  export MOAT_BENCH_MB=${MOAT_BENCH_MB:-32} MOAT_BENCH_CONNS=${MOAT_BENCH_CONNS:-50}
fi

cargo build --release || {
  echo "bench: cargo build --release failed" >&2
  exit 1
}

status=()
step() { # step NAME CMD...: run, log, remember the exit status
  local name=$1
  shift
  echo "=== $name: $*" >&2
  local start=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  status+=("$name rc=$rc $((SECONDS - start))s")
  [ "$rc" = 0 ] || echo "bench: $name failed (exit $rc); see $out/$name.log" >&2
}

rm -f "$out"/{egress_tcp,verdict,footprint,many_flows}.txt
# Lines of earlier runs in pps.txt (appended to by every run); none on a fresh tree.
pps_mark=0
[ -f "$out/pps.txt" ] && pps_mark=$(wc -l <"$out/pps.txt")
step pps scripts/bench-pps.sh
step egress_tcp cargo bench --bench egress_tcp
step verdict cargo bench --bench verdict
step footprint cargo bench --bench footprint
if [ "$quick" != 0 ] && [ -n "$quick" ]; then
  export MOAT_FLOWS=${MOAT_FLOWS:-1000} MOAT_BUSY=${MOAT_BUSY:-200} MOAT_RR=${MOAT_RR:-500}
fi
step many_flows cargo bench --bench many_flows

summary() {
  printf '%-30s %-42s %24s %24s %9s\n' peer figure moat "peer value" ratio
  # Packet rate: this run's table at the end of pps.txt.
  if [ -f "$out/pps.txt" ]; then
    tail -n +"$((pps_mark + 1))" "$out/pps.txt" | awk '
      /^## table/ { t = 1; next }
      /^#/ { t = 0 }
      t && $1 != "case" { mpps[$1 " " $2] = $3; percpu[$1 " " $2] = $6; peer[$1 " " $2] = $7; order[++n] = $1 " " $2 }
      END {
        for (i = 1; i <= n; i++) {
          split(order[i], k, " ")
          p = peer[order[i]]
          if (p == "-" || p == "") continue
          name = (p == "ceiling") ? "DPDK vhost PMD rxonly" : (p == "ceiling-macswap") ? "DPDK vhost PMD macswap" : "passt --vhost-user, UDP"
          c = mpps[p " " k[2]]; m = mpps[order[i]]
          r = (c + 0 > 0 && m != "-") ? sprintf("%.3f", m / c) : "-"
          printf "%-30s %-42s %24s %24s %9s\n", name, k[1] " " k[2] "B Mpps", m, c, r
          c = percpu[p " " k[2]]; m = percpu[order[i]]
          r = (c + 0 > 0 && m != "-") ? sprintf("%.3f", m / c) : "-"
          printf "%-30s %-42s %24s %24s %9s\n", name, k[1] " " k[2] "B Mpps per CPU-s", m, c, r
        }
      }'
  fi
  if [ -f "$out/egress_tcp.txt" ]; then
    # Rows are "{name:<W} {value:>10.3} {unit:<8} {cpu:>12.3} {path cpu:>12.3} {cost}": the
    # name may have spaces; W from where the header's right-aligned "value" ends.
    awk 'NR == 1 { w = index($0, "value") + 4 - 11; next }
      {
      name = substr($0, 1, w); sub(/ +$/, "", name)
      split(substr($0, w + 2), f, " ")
      peer = (name ~ /passt|loopback/) ? "(is the peer row)" : "egress_tcp: see passt rows"
      printf "%-30s %-42s %24s %24s %9s\n", peer, name " " f[2], f[1], "-", "-"
      # Bulk rows: CPU-s per Gbit of the backend alone / of the whole path (moat + proxy
      # process; passt alone), from the cost column "X CPU-s/Gbit backend, Y whole path".
      if (f[6] == "CPU-s/Gbit")
        printf "%-30s %-42s %24s %24s %9s\n", peer, name " CPU-s/Gbit backend / path", f[5] " / " f[8], "-", "-"
    }' "$out/egress_tcp.txt"
  fi
  if [ -f "$out/verdict.txt" ]; then
    # Column 7 ("like"): whether moat and etherparse do the same work on that frame; the
    # rows that do not (IPv6 dropped on its ethertype, a truncated frame) are shown without a
    # ratio and left out of the headline range.
    awk 'NR > 1 {
        if ($7 == "yes") {
          printf "%-30s %-42s %24s %24s %9s\n", "etherparse SlicedPacket", $1 " ns/frame", $3, $4, $5
          r = $5 + 0; n++; lg += log(r); if (lo == "" || r < lo) lo = r; if (hi == "" || r > hi) hi = r
        } else {
          printf "%-30s %-42s %24s %24s %9s\n", "etherparse (not like-for-like)", $1 " ns/frame", $3, $4, "-"
        }
      }
      END { if (n) printf "%-30s %-42s %24s %24s %9s\n", "etherparse SlicedPacket", "parse+verdict, like-for-like rows", "range " lo " - " hi, "-", sprintf("%.2f", exp(lg / n)) }' \
      "$out/verdict.txt"
  fi
  if [ -f "$out/footprint.txt" ]; then
    awk -F' *[|] *' '/^raw / || NR == 1 { next }
      {
        split($3, m, " "); split($2, t, " ")
        tv = ($2 ~ /^~0/) ? $2 : t[2] " " t[3]
        printf "%-30s %-42s %24s %24s %9s\n", "issue target", substr($1, 1, 42), m[1] " " m[2], tv, $4
      }' "$out/footprint.txt"
  fi
  if [ -f "$out/many_flows.txt" ]; then
    # "other flows open  p50 p99 base-p50 ratio": each phase against a second moat with
    # nothing else open, measured in alternating blocks in the same run.
    awk '/^#/ || /^other flows/ || /^moat CPU/ || /^\(/ { next }
      {
        n = NF; ratio = $n; base = $(n - 1); p50 = $(n - 3); name = $0
        sub(/ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$/, "", name)
        printf "%-30s %-42s %24s %24s %9s\n", "same flow, no other flow open", "RR p50 us, " substr(name, 1, 31), p50, base, ratio
      }' "$out/many_flows.txt"
  fi
}

{
  echo "# moat bench summary, $(date -u +%FT%TZ), $(nproc) CPUs$([ "$quick" != 0 ] && [ -n "$quick" ] && echo ', QUICK')"
  summary
  echo
  echo "ratio = moat / peer (packet rate: higher is better; ns/frame, RSS, CPU: lower is better)"
  echo "steps: ${status[*]}"
} | tee "$out/summary.txt"
