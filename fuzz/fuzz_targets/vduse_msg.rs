//! What the kernel hands a VDUSE device: its messages (read from /dev/vduse/NAME), IOTLB entries,
//! queue sizes and the driver's feature word, each through the daemon's own checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_card::vduse::iotlb::check_entry;
use vhost_card::vduse::msg::{self, Request};
use vhost_card::vduse::session::{check_features, check_queue};
use vhost_card::vduse::uapi::{IotlbEntry, MSG_SIZE};

fn u64_at(d: &[u8], at: usize) -> u64 {
    d.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    // A message of any length: only a whole request parses, and its answer is well formed.
    if let Some(req) = Request::parse(data) {
        let r = msg::response(req.id(), msg::RESULT_OK, Some((0, 0)));
        assert_eq!(r.len(), MSG_SIZE);
    }
    if data.len() >= MSG_SIZE {
        let _ = Request::parse(&data[..MSG_SIZE]);
    }
    // The same bytes as an IOTLB entry, a queue size and a feature word.
    let e = IotlbEntry {
        offset: u64_at(data, 0),
        start: u64_at(data, 8),
        last: u64_at(data, 16),
        perm: data.get(24).copied().unwrap_or(0),
    };
    if let Ok(size) = check_entry(&e, u64_at(data, 32)) {
        assert!(size > 0 && e.start.checked_add(size - 1) == Some(e.last));
    }
    let num = u64_at(data, 40) as u32;
    if let Ok(n) = check_queue(num, 1024) {
        assert!(n.is_power_of_two() && n <= 1024);
    }
    let _ = check_features(u64_at(data, 48), u64_at(data, 56));
});
