//! `[limits]`.

use super::*;

#[test]
fn limits_rules() {
    for bad in ["0", "1000001", "-1"] {
        fails(
            &format!("{VM}[limits]\nmax_flows = {bad}\n"),
            "limits.max_flows",
            (6, 13),
            &format!("{bad} is outside 1..=1000000"),
        );
    }
    fails(
        &format!("{VM}[limits]\negress_bps = -5\n"),
        "limits.egress_bps",
        (6, 14),
        "-5 is negative; use 0 for unlimited",
    );
    fails(
        &format!("{VM}[limits]\ningress_bps = -1\n"),
        "limits.ingress_bps",
        (6, 15),
        "is negative",
    );
    fails(
        &format!("{VM}[limits]\nburst_bytes = -1\n"),
        "limits.burst_bytes",
        (6, 15),
        "-1 is negative; use 0 for the default depth",
    );
    let p = parse(&format!(
        "{VM}[limits]\nmax_flows = 1000000\negress_bps = 125000000\nburst_bytes = 262144\n"
    ))
    .unwrap();
    assert_eq!(
        (
            p.limits.max_flows,
            p.limits.egress_bps,
            p.limits.ingress_bps,
            p.limits.burst_bytes
        ),
        (1_000_000, 125_000_000, 0, 262_144)
    );
}
