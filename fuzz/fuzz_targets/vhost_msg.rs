//! The vhost-user messages the card parses itself, in front of the `vhost` crate's handler:
//! the gate's request loop (header, size limit, body, SET_MEM_TABLE checks, NET_SET_MTU, early
//! SET_VRING_ENABLE held and replayed after SET_FEATURES) over an arbitrary byte stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_card::gate::{screen_stream, GateConfig};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the queue count, so index checks see both edges.
    let Some((&q, stream)) = data.split_first() else {
        return;
    };
    let cfg = GateConfig {
        mtu: 65520,
        num_queues: u32::from(q % 8) + 1,
        queue_size: 256,
    };
    let _ = screen_stream(stream, cfg);
    // The memory-table parser on its own, over the same bytes.
    let _ = vhost_card::gate::parse_mem_table(stream);
});
