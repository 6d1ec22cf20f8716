#![no_main]
//! Guest TX buffer (12-byte virtio-net header + frame) -> verdict/answer, with every
//! offload acked (so partial checksums and TSO headers are taken, checked and completed).
use libfuzzer_sys::fuzz_target;
mod common;

thread_local! {
    static DP: std::cell::RefCell<moat::datapath::Datapath> = std::cell::RefCell::new({
        let mut dp = common::datapath();
        dp.set_offloads(moat::frame::virtio_hdr::Offloads {
            csum: true,
            host_tso4: true,
            guest_csum: true,
            guest_tso4: true,
        });
        dp
    });
}

fuzz_target!(|data: &[u8]| {
    DP.with(|dp| {
        let mut dp = dp.borrow_mut();
        if data.len() <= dp.max_tx_len() {
            let mut copy = data.to_vec();
            let _ = dp.guest_frame(&mut copy);
        }
    });
});
