//! What the flow table shows of itself: one row per flow, copied out for `moat stats`
//! (formatted by `control`, carried across queue pairs by `device`).

/// One flow of the table, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSnapshot {
    pub flow: String,
    pub target: String,
    pub state: String,
    /// Guest -> proxy and proxy -> guest, counted in `unit`.
    pub up: u64,
    pub down: u64,
    /// "bytes" (a TCP flow) or "datagrams" (a UDP association).
    pub unit: &'static str,
}
