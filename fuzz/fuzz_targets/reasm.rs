//! The reassembly table on arbitrary frames: a run of frames (each a 2-byte length and its
//! bytes), offered in order with the clock moving by the fuzzer's choice. Nothing panics; every
//! completed datagram has IP lengths that match its size, and cut to any MTU it comes back as
//! pieces within that MTU that reassemble to the same bytes (when they are at most `MAX_FRAGS`,
//! the most the table takes for one datagram).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vhost_card::reasm::{Outcome, Reassembler, HEAD, MAX_FRAGS};

const ETH: usize = 14;

fn offer(r: &mut Reassembler, now: Instant, f: &[u8]) -> Outcome {
    r.offer(now, &f[..f.len().min(HEAD)], f.len(), |from, dst| {
        dst.copy_from_slice(&f[from..from + dst.len()])
    })
}

fn check(d: &[u8]) {
    let ip = &d[ETH..];
    match ip[0] >> 4 {
        4 => {
            assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
            assert_eq!(ip[6] & 0x3f, 0, "MF or offset left");
            assert_eq!(ip[7], 0);
        }
        6 => assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])) + 40, ip.len()),
        v => panic!("IP version {v}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mtu_byte, mut rest)) = data.split_first() else {
        return;
    };
    let t0 = Instant::now();
    let mut now = t0;
    let mut r = Reassembler::new();
    while rest.len() >= 3 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]) & 0x7fff);
        now += Duration::from_secs(u64::from(rest[2] & 0x3f));
        rest = &rest[3..];
        let f = &rest[..len.min(rest.len())];
        rest = &rest[f.len()..];
        if let Outcome::Complete(slot) = offer(&mut r, now, f) {
            let whole = r.datagram(slot).to_vec();
            check(&whole);
            let mtu = 68 + usize::from(mtu_byte) * 16;
            let mut pieces = Vec::new();
            r.split(slot, mtu, |len, fill| {
                let mut v = vec![0u8; len];
                fill(&mut v);
                pieces.push(v);
                true
            });
            r.release(slot);
            let mut again = Reassembler::new();
            let mut back = None;
            for p in &pieces {
                assert!(p.len() - ETH <= mtu.max(whole.len() - ETH), "piece beyond the MTU");
                if let Outcome::Complete(s) = offer(&mut again, t0, p) {
                    back = Some(again.datagram(s).to_vec());
                }
            }
            // More pieces than one datagram may have in the table (an IPv6 datagram of 3 KB cut
            // to a 68-byte MTU is 188) are refused by design, not reassembled.
            if pieces.len() > 1 && pieces.len() <= MAX_FRAGS {
                assert_eq!(back.as_deref(), Some(&whole[..]), "pieces do not reassemble");
            }
        }
    }
});
