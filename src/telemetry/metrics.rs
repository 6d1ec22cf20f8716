//! Prometheus text exposition of a VM's counters (prometheus-client for the format, tiny_http
//! for the one endpoint), on a loopback address or a unix socket.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use thiserror::Error;

use super::{Counters, DnsOutcome, DropReason, FlowEvent, Service, Traffic};

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("--metrics {0}: give a loopback address (127.0.0.1:9100, [::1]:9100) or an absolute unix socket path")]
    NotLoopback(String),
    #[error("--metrics {addr}: cannot listen: {reason}")]
    Listen { addr: String, reason: String },
}

/// The exposition text for one VM.
pub fn render(vm: &str, c: &Counters) -> String {
    let mut registry = Registry::with_prefix("moat");
    let label =
        |k: &'static str, v: &str| -> Labels { vec![("vm", vm.to_string()), (k, v.to_string())] };

    let drops = Family::<Labels, Counter>::default();
    registry.register("drops", "Frames dropped, by reason", drops.clone());
    for r in DropReason::ALL {
        drops
            .get_or_create(&label("reason", r.as_str()))
            .inc_by(c.drops(*r));
    }
    let frames = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let kicks = Family::<Labels, Counter>::default();
    registry.register(
        "frames",
        "Frames from the guest (tx) and to the guest (rx)",
        frames.clone(),
    );
    registry.register(
        "bytes",
        "Bytes from the guest (tx) and to the guest (rx)",
        bytes.clone(),
    );
    registry.register("kicks", "Queue kicks from the guest", kicks.clone());
    frames
        .get_or_create(&label("direction", "tx"))
        .inc_by(c.traffic(Traffic::TxFrames));
    frames
        .get_or_create(&label("direction", "rx"))
        .inc_by(c.traffic(Traffic::RxFrames));
    bytes
        .get_or_create(&label("direction", "tx"))
        .inc_by(c.traffic(Traffic::TxBytes));
    bytes
        .get_or_create(&label("direction", "rx"))
        .inc_by(c.traffic(Traffic::RxBytes));
    kicks
        .get_or_create(&label("queue", "tx"))
        .inc_by(c.traffic(Traffic::TxKicks));
    kicks
        .get_or_create(&label("queue", "rx"))
        .inc_by(c.traffic(Traffic::RxKicks));
    let notifications = Family::<Labels, Counter>::default();
    registry.register(
        "notifications",
        "Interrupts sent to the guest",
        notifications.clone(),
    );
    notifications
        .get_or_create(&vec![("vm", vm.to_string())])
        .inc_by(c.traffic(Traffic::Notifications));

    let answers = Family::<Labels, Counter>::default();
    registry.register(
        "answers",
        "Frames the gateway answered itself, by service",
        answers.clone(),
    );
    for s in Service::ALL {
        answers
            .get_or_create(&label("service", s.as_str()))
            .inc_by(c.answers(*s));
    }
    let dns = Family::<Labels, Counter>::default();
    registry.register("dns_answers", "DNS queries, by result", dns.clone());
    for o in DnsOutcome::ALL {
        dns.get_or_create(&label("result", o.as_str()))
            .inc_by(c.dns(*o));
    }
    let flows = Family::<Labels, Counter>::default();
    registry.register(
        "flow_events",
        "Flow events: opened, closed, reset, proxy_failed, forward_refused",
        flows.clone(),
    );
    for e in FlowEvent::ALL {
        flows
            .get_or_create(&label("event", e.as_str()))
            .inc_by(c.flows(*e));
    }
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let g = Family::<Labels, Gauge>::default();
        registry.register(name, help, g.clone());
        g.get_or_create(&vec![("vm", vm.to_string())])
            .set(value as i64);
    };
    gauge(
        &mut registry,
        "flows_open",
        "Flows open now",
        c.flows_open.load(Ordering::Relaxed),
    );
    gauge(
        &mut registry,
        "policy_generation",
        "Policy generation in force (1 = as started)",
        c.policy_generation.load(Ordering::Relaxed),
    );
    let reloads = Family::<Labels, Counter>::default();
    registry.register(
        "policy_reloads",
        "Policy reloads, by result",
        reloads.clone(),
    );
    reloads
        .get_or_create(&label("result", "ok"))
        .inc_by(c.reloads.load(Ordering::Relaxed));
    reloads
        .get_or_create(&label("result", "refused"))
        .inc_by(c.reload_failures.load(Ordering::Relaxed));

    let mut out = String::new();
    // Encoding into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

/// Serve `GET /metrics` on `addr` (loopback `IP:PORT`, or a unix socket path) from a thread.
pub fn serve(addr: &str, vm: String, counters: Arc<Counters>) -> Result<(), MetricsError> {
    let listen_err = |e: Box<dyn std::error::Error + Send + Sync>| MetricsError::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    };
    let server = if addr.starts_with('/') {
        let _ = std::fs::remove_file(addr);
        tiny_http::Server::http_unix(std::path::Path::new(addr)).map_err(listen_err)?
    } else {
        let sock: std::net::SocketAddr = addr
            .parse()
            .map_err(|_| MetricsError::NotLoopback(addr.to_string()))?;
        if !sock.ip().is_loopback() {
            return Err(MetricsError::NotLoopback(addr.to_string()));
        }
        tiny_http::Server::http(sock).map_err(listen_err)?
    };
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let header = tiny_http::Header::from_bytes(
                        "Content-Type",
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                    .ok();
                    let r = tiny_http::Response::from_string(render(&vm, &counters));
                    match header {
                        Some(h) => r.with_header(h),
                        None => r,
                    }
                } else {
                    tiny_http::Response::from_string("moat serves /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .map_err(|e| MetricsError::Listen {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_with_the_vm_label() {
        let c = Counters::default();
        c.drop_frame(DropReason::Ipv6, format_args!("t"));
        c.answered(Service::Arp);
        let text = render("vm-1", &c);
        assert!(
            text.contains("moat_drops_total{vm=\"vm-1\",reason=\"ipv6\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("moat_answers_total{vm=\"vm-1\",service=\"arp\"} 1"),
            "{text}"
        );
        for family in [
            "moat_frames_total",
            "moat_bytes_total",
            "moat_kicks_total",
            "moat_dns_answers_total",
            "moat_flow_events_total",
            "moat_flows_open",
            "moat_policy_generation",
            "moat_policy_reloads_total",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
