#![no_main]
//! Guest TX buffer (12-byte virtio-net header + frame) -> verdict/answer.
use libfuzzer_sys::fuzz_target;
mod common;

thread_local! {
    static DP: std::cell::RefCell<moat::datapath::Datapath> = std::cell::RefCell::new(common::datapath());
}

fuzz_target!(|data: &[u8]| {
    DP.with(|dp| {
        let mut dp = dp.borrow_mut();
        if data.len() <= dp.max_tx_len() {
            let _ = dp.guest_frame(data);
        }
    });
});
