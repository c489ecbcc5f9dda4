//! Reassembly of IP fragments going up to the host, so datagrams forwarded from the card's
//! 1500-byte wires cross the 64 KiB link whole and the host reassembles nothing (the seed moves
//! fragment processing onto the card). Pure logic over byte slices, one table per queue pair:
//!
//! * a bounded table ([`SLOTS`] datagrams at once), each slot's 64 KiB buffer allocated the first
//!   time it is used and kept, so the steady state allocates nothing;
//! * datagrams are identified as RFC 791 (source, destination, protocol, identification) and
//!   RFC 8200 (source, destination, identification) say; incomplete ones expire after 30 s
//!   (IPv4, Linux's `ipfrag_time`) or 60 s (IPv6, RFC 8200); a new datagram when the table is
//!   full evicts the oldest;
//! * overlaps: an exact duplicate fragment (same offset and length) is dropped and the datagram
//!   kept (RFC 8200, 4.5); any other overlap discards the whole datagram, for IPv6 as RFC 5722
//!   requires and for IPv4 too (the conservative policy: no overlapping-fragment attack can choose
//!   which bytes the host sees, as Linux does since 4.19); fragments that are not a multiple of 8
//!   bytes but the last, a second and different end, data beyond the end, more than
//!   [`MAX_FRAGS`] fragments, a datagram beyond 65535 bytes, or ECN codepoints that cannot be
//!   combined (RFC 3168, 5.3) discard it too;
//! * the whole datagram is the first fragment's headers (IPv4 options included; for IPv6 the
//!   unfragmentable part, the Fragment header taken out) with the lengths, flags and checksum
//!   made right, followed by the payload;
//! * a datagram larger than the host's MTU is split again into the fewest pieces that fit
//!   ([`Reassembler::split`]), so the link's MTU still holds.

use std::time::{Duration, Instant};

use crate::vnet::ETH_HLEN;

/// Datagrams being reassembled at once, per queue pair.
pub const SLOTS: usize = 32;
/// Fragments one datagram may have (a 64 KiB datagram in 1500-byte fragments has 45).
pub const MAX_FRAGS: usize = 128;
/// Room in front of the payload for the Ethernet header and the first fragment's IP headers.
const HDR_ROOM: usize = 256;
/// Largest payload offset + length (the IP length fields are 16 bits).
const MAX_PAYLOAD: usize = 65535;
/// Bytes of a frame that must be at hand to parse a fragment's headers.
pub const HEAD: usize = HDR_ROOM;
pub const TIMEOUT_V4: Duration = Duration::from_secs(30);
pub const TIMEOUT_V6: Duration = Duration::from_secs(60);

const IPPROTO_FRAGMENT: u8 = 44;

/// What became of a frame offered to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not a fragment this table takes: goes up as it is.
    NotFragment,
    /// Taken in; the datagram is not complete yet.
    Held,
    /// Taken in, and its datagram is complete in this slot (read it with
    /// [`Reassembler::datagram`], then [`Reassembler::release`] it).
    Complete(usize),
    /// The fragment was dropped (a duplicate), its datagram kept.
    Duplicate,
    /// The fragment and its whole datagram were discarded.
    Discarded(Discard),
}

/// Why a datagram was discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    Overlap,
    /// Bad lengths or offsets, beyond 65535 bytes, too many fragments, ECN that cannot combine.
    Malformed,
}

/// Datagrams the table gave up on while making room or on time, since the last call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lost {
    pub timed_out: u64,
    pub evicted: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        id: u16,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        id: u32,
    },
}

/// One fragment's headers, parsed.
#[derive(Debug, Clone, Copy)]
struct Frag {
    key: Key,
    /// Payload offset in the datagram, and whether more fragments follow.
    offset: usize,
    more: bool,
    /// Bytes of IP headers that stay in the datagram (IPv4 header; IPv6 header and the
    /// extension headers before the Fragment header).
    ip_len: usize,
    /// Where the fragment's payload starts in the frame, and its length.
    payload_at: usize,
    payload_len: usize,
    /// IPv6: the offset (from the IP header) of the Next Header field that named the Fragment
    /// header, and the protocol the Fragment header names.
    next_field: usize,
    next: u8,
    /// The ECN codepoint (0 Not-ECT, 1/2 ECT, 3 CE).
    ecn: u8,
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// Parses the headers of an untagged IPv4 or IPv6 fragment in an Ethernet frame of `frame_len`
/// bytes whose first bytes are `head`.
fn parse(head: &[u8], frame_len: usize) -> Option<Frag> {
    if head.len() < ETH_HLEN + 20 {
        return None;
    }
    let ip = &head[ETH_HLEN..];
    let avail = frame_len - ETH_HLEN;
    match (be16(head, 12), ip[0] >> 4) {
        (0x0800, 4) => {
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let total = be16(ip, 2);
            let frag = be16(ip, 6);
            let (more, offset) = (frag & 0x2000 != 0, (frag & 0x1fff) * 8);
            if (!more && offset == 0) || ihl < 20 || total < ihl || total > avail || ihl > ip.len()
            {
                return None;
            }
            Some(Frag {
                key: Key::V4 {
                    src: ip[12..16].try_into().ok()?,
                    dst: ip[16..20].try_into().ok()?,
                    proto: ip[9],
                    id: u16::from_be_bytes([ip[4], ip[5]]),
                },
                offset,
                more,
                ip_len: ihl,
                payload_at: ETH_HLEN + ihl,
                payload_len: total - ihl,
                next_field: 0,
                next: ip[9],
                ecn: ip[1] & 3,
            })
        }
        (0x86dd, 6) if ip.len() >= 40 => {
            let end = 40 + be16(ip, 4);
            if end > avail || end == 40 {
                return None;
            }
            // Hop-by-hop, routing and destination options may precede the Fragment header.
            let (mut next_field, mut at) = (6, 40);
            loop {
                let next = ip[next_field];
                match next {
                    0 | 43 | 60 => {
                        let len = (usize::from(*ip.get(at + 1)?) + 1) * 8;
                        next_field = at;
                        at += len;
                        if at > end {
                            return None;
                        }
                    }
                    IPPROTO_FRAGMENT => break,
                    _ => return None,
                }
            }
            let f = ip.get(at..at + 8)?;
            if at + 8 > end {
                return None;
            }
            let (offset, more) = (be16(f, 2) & !7, f[3] & 1 != 0);
            if offset == 0 && !more {
                // An atomic fragment (RFC 6946): a whole datagram already.
                return None;
            }
            Some(Frag {
                key: Key::V6 {
                    src: ip[8..24].try_into().ok()?,
                    dst: ip[24..40].try_into().ok()?,
                    id: u32::from_be_bytes(f[4..8].try_into().ok()?),
                },
                offset,
                more,
                ip_len: at,
                payload_at: ETH_HLEN + at + 8,
                payload_len: end - at - 8,
                next_field,
                next: f[0],
                ecn: (ip[1] >> 4) & 3,
            })
        }
        _ => None,
    }
}

/// Bytes of a frame that tell whether it may be a fragment ([`may_be_fragment`]).
pub const SNIFF: usize = ETH_HLEN + 8;

/// Whether an Ethernet frame starting with `b` (at least [`SNIFF`] bytes) may be an IP
/// fragment: IPv4 with MF or an offset, IPv6 whose first header after the fixed one is a
/// Fragment header or one that may precede it. Cheap, for every frame.
pub fn may_be_fragment(b: &[u8]) -> bool {
    if b.len() < SNIFF {
        return false;
    }
    match (b[12], b[13], b[14] >> 4) {
        (0x08, 0x00, 4) => b[20] & 0x3f != 0 || b[21] != 0,
        (0x86, 0xdd, 6) => matches!(b[20], 0 | 43 | 60 | IPPROTO_FRAGMENT),
        _ => false,
    }
}

/// One datagram being put together.
struct Slot {
    key: Option<Key>,
    started: Instant,
    /// `[.. HDR_ROOM]`: the Ethernet and IP headers of the first fragment, right-aligned;
    /// `[HDR_ROOM ..]`: the payload at its offset.
    buf: Vec<u8>,
    /// Ethernet + IP header bytes stored (0 until the first fragment came).
    hdr_len: usize,
    /// IPv6 fields of the first fragment (see `Frag`).
    next_field: usize,
    next: u8,
    frags: Vec<(usize, usize)>,
    received: usize,
    /// The payload's length, once the last fragment came.
    total: Option<usize>,
    /// ECN codepoints seen (bit per codepoint).
    ecn: u8,
}

impl Slot {
    fn new() -> Self {
        Slot {
            key: None,
            started: Instant::now(),
            buf: Vec::new(),
            hdr_len: 0,
            next_field: 0,
            next: 0,
            frags: Vec::new(),
            received: 0,
            total: None,
            ecn: 0,
        }
    }

    fn start(&mut self, key: Key, now: Instant) {
        if self.buf.is_empty() {
            // Once per slot for the life of the worker.
            self.buf = vec![0; HDR_ROOM + MAX_PAYLOAD];
            self.frags = Vec::with_capacity(MAX_FRAGS);
        }
        self.key = Some(key);
        self.started = now;
        self.hdr_len = 0;
        self.frags.clear();
        self.received = 0;
        self.total = None;
        self.ecn = 0;
    }

    fn timeout(&self) -> Duration {
        match self.key {
            Some(Key::V6 { .. }) => TIMEOUT_V6,
            _ => TIMEOUT_V4,
        }
    }

    fn is_v6(&self) -> bool {
        matches!(self.key, Some(Key::V6 { .. }))
    }

    /// The ECN codepoints combined (RFC 3168, 5.3): `Err` when Not-ECT meets ECT or CE,
    /// `Ok(true)` when a fragment had CE (the datagram gets it), `Ok(false)` to keep the first
    /// fragment's.
    fn ecn_ce(&self) -> Result<bool, ()> {
        let not_ect = self.ecn & 1 != 0;
        let ect_or_ce = self.ecn & 0b1110 != 0;
        if not_ect && ect_or_ce {
            Err(())
        } else {
            Ok(self.ecn & 0b1000 != 0)
        }
    }
}

/// The reassembly table of one queue pair.
pub struct Reassembler {
    slots: Vec<Slot>,
    lost: Lost,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reassembler {
    pub fn new() -> Self {
        Reassembler {
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
            lost: Lost::default(),
        }
    }

    /// Datagrams given up since the last call (expired, or evicted for room).
    pub fn take_lost(&mut self) -> Lost {
        std::mem::take(&mut self.lost)
    }

    /// Datagrams in the table.
    pub fn pending(&self) -> usize {
        self.slots.iter().filter(|s| s.key.is_some()).count()
    }

    /// Forgets every datagram (a frontend session ended).
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.key = None;
        }
    }

    /// Offers a frame of `frame_len` bytes whose first bytes are `head` (at least
    /// `min(frame_len, HEAD)` of them); `read(from, dst)` copies the frame's bytes from offset
    /// `from` into `dst` (the payload, wherever the frame lies).
    pub fn offer(
        &mut self,
        now: Instant,
        head: &[u8],
        frame_len: usize,
        read: impl FnOnce(usize, &mut [u8]),
    ) -> Outcome {
        let Some(f) = parse(head, frame_len) else {
            return Outcome::NotFragment;
        };
        for s in &mut self.slots {
            if s.key.is_some() && now.saturating_duration_since(s.started) > s.timeout() {
                s.key = None;
                self.lost.timed_out += 1;
            }
        }
        let i = match self.slots.iter().position(|s| s.key == Some(f.key)) {
            Some(i) => i,
            None => {
                let i = match self.slots.iter().position(|s| s.key.is_none()) {
                    Some(i) => i,
                    None => {
                        let (i, _) = self
                            .slots
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, s)| s.started)
                            .unwrap_or((0, &self.slots[0]));
                        self.lost.evicted += 1;
                        i
                    }
                };
                self.slots[i].start(f.key, now);
                i
            }
        };
        let s = &mut self.slots[i];
        match Self::insert(s, &f, head, read) {
            Ok(true) => Outcome::Complete(i),
            Ok(false) => Outcome::Held,
            Err(None) => Outcome::Duplicate,
            Err(Some(why)) => {
                s.key = None;
                Outcome::Discarded(why)
            }
        }
    }

    /// Puts a fragment into its slot. Ok(complete), Err(None) for a duplicate, Err(Some) when
    /// the datagram must go.
    fn insert(
        s: &mut Slot,
        f: &Frag,
        head: &[u8],
        read: impl FnOnce(usize, &mut [u8]),
    ) -> Result<bool, Option<Discard>> {
        let (start, end) = (f.offset, f.offset + f.payload_len);
        if (f.more && (f.payload_len == 0 || f.payload_len % 8 != 0)) || end > MAX_PAYLOAD {
            return Err(Some(Discard::Malformed));
        }
        if f.offset == 0 && ETH_HLEN + f.ip_len > HDR_ROOM.min(head.len()) {
            return Err(Some(Discard::Malformed));
        }
        if s.frags.iter().any(|&(a, b)| (a, b) == (start, end)) {
            return Err(None);
        }
        if s.frags.iter().any(|&(a, b)| a < end && start < b) {
            return Err(Some(Discard::Overlap));
        }
        match (f.more, s.total) {
            (false, Some(t)) if t != end => return Err(Some(Discard::Malformed)),
            (false, _) if s.frags.iter().any(|&(_, b)| b > end) => {
                return Err(Some(Discard::Malformed))
            }
            (true, Some(t)) if end > t => return Err(Some(Discard::Malformed)),
            _ => {}
        }
        if s.frags.len() == MAX_FRAGS {
            return Err(Some(Discard::Malformed));
        }
        if !f.more {
            s.total = Some(end);
        }
        read(f.payload_at, &mut s.buf[HDR_ROOM + start..HDR_ROOM + end]);
        if f.offset == 0 {
            let n = ETH_HLEN + f.ip_len;
            s.buf[HDR_ROOM - n..HDR_ROOM].copy_from_slice(&head[..n]);
            s.hdr_len = n;
            s.next_field = f.next_field;
            s.next = f.next;
        }
        s.ecn |= 1 << f.ecn;
        s.frags.push((start, end));
        s.received += f.payload_len;
        let complete = s.hdr_len > 0 && s.total == Some(s.received);
        if complete && !Self::finish(s) {
            return Err(Some(Discard::Malformed));
        }
        Ok(complete)
    }

    /// Makes the stored headers those of the whole datagram; false if it cannot be one.
    fn finish(s: &mut Slot) -> bool {
        let Some(total) = s.total else { return false };
        let Ok(ce) = s.ecn_ce() else { return false };
        let ip_len = s.hdr_len - ETH_HLEN;
        let v6 = s.is_v6();
        let ip = &mut s.buf[HDR_ROOM - ip_len..HDR_ROOM];
        if v6 {
            let len = ip_len - 40 + total;
            let Ok(len) = u16::try_from(len) else {
                return false;
            };
            ip[4..6].copy_from_slice(&len.to_be_bytes());
            ip[s.next_field] = s.next;
            if ce {
                ip[1] |= 0x30;
            }
        } else {
            let Ok(len) = u16::try_from(ip_len + total) else {
                return false;
            };
            ip[2..4].copy_from_slice(&len.to_be_bytes());
            // Keep DF; no MF, offset 0.
            ip[6] &= 0x40;
            ip[7] = 0;
            if ce {
                ip[1] |= 3;
            }
            set_ipv4_checksum(ip);
        }
        true
    }

    /// The whole datagram of a completed slot, as an Ethernet frame.
    pub fn datagram(&self, slot: usize) -> &[u8] {
        let s = &self.slots[slot];
        let total = s.total.unwrap_or(0);
        &s.buf[HDR_ROOM - s.hdr_len..HDR_ROOM + total]
    }

    /// Frees a completed slot.
    pub fn release(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.key = None;
        }
    }

    /// Cuts a completed datagram larger than `mtu` (IP bytes) into fragments of at most `mtu`:
    /// `push(len, fill)` is called for each, `fill` writing the Ethernet frame of `len` bytes.
    /// IPv4 options not marked "copy" stay in the first fragment only (RFC 791). Returns how
    /// many fragments were pushed (`push` returning false stops).
    pub fn split(
        &self,
        slot: usize,
        mtu: usize,
        mut push: impl FnMut(usize, &dyn Fn(&mut [u8])) -> bool,
    ) -> usize {
        let s = &self.slots[slot];
        let total = s.total.unwrap_or(0);
        let hdr = &s.buf[HDR_ROOM - s.hdr_len..HDR_ROOM];
        let payload = &s.buf[HDR_ROOM..HDR_ROOM + total];
        let ip_len = s.hdr_len - ETH_HLEN;
        let v6 = s.is_v6();
        let per_frag_hdr = if v6 { ip_len + 8 } else { ip_len };
        let room = mtu.saturating_sub(per_frag_hdr) & !7;
        if room == 0 {
            return 0;
        }
        let mut pushed = 0;
        let mut at = 0;
        while at < total {
            let n = room.min(total - at);
            let more = at + n < total;
            let first = at == 0;
            let len = s.hdr_len + if v6 { 8 } else { 0 } + n;
            let fill = |out: &mut [u8]| {
                out[..s.hdr_len].copy_from_slice(hdr);
                let ip = &mut out[ETH_HLEN..];
                if v6 {
                    let plen = (ip_len - 40 + 8 + n) as u16;
                    ip[4..6].copy_from_slice(&plen.to_be_bytes());
                    ip[s.next_field] = IPPROTO_FRAGMENT;
                    let id = match s.key {
                        Some(Key::V6 { id, .. }) => id,
                        _ => 0,
                    };
                    let f = &mut ip[ip_len..ip_len + 8];
                    f[0] = s.next;
                    f[1] = 0;
                    f[2..4].copy_from_slice(&((at as u16) | u16::from(more)).to_be_bytes());
                    f[4..8].copy_from_slice(&id.to_be_bytes());
                    ip[ip_len + 8..ip_len + 8 + n].copy_from_slice(&payload[at..at + n]);
                } else {
                    ip[2..4].copy_from_slice(&((ip_len + n) as u16).to_be_bytes());
                    let frag = (ip[6] as u16 & 0x40) << 8 | (at / 8) as u16 | u16::from(more) << 13;
                    ip[6..8].copy_from_slice(&frag.to_be_bytes());
                    if !first {
                        strip_uncopied_options(&mut ip[20..ip_len]);
                    }
                    set_ipv4_checksum(&mut ip[..ip_len]);
                    ip[ip_len..ip_len + n].copy_from_slice(&payload[at..at + n]);
                }
            };
            if !push(len, &fill) {
                break;
            }
            pushed += 1;
            at += n;
        }
        pushed
    }
}

/// Recomputes an IPv4 header's checksum in place.
fn set_ipv4_checksum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let c = crate::csum::complement(crate::csum::sum_slice(h));
    h[10..12].copy_from_slice(&c);
}

/// Replaces IPv4 options that are not copied into every fragment with NOPs (as Linux's
/// `ip_options_fragment`).
fn strip_uncopied_options(opts: &mut [u8]) {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            t => {
                let len = usize::from(*opts.get(i + 1).unwrap_or(&0)).clamp(2, opts.len() - i);
                if t & 0x80 == 0 {
                    opts[i..i + len].fill(1);
                }
                i += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket};

    const SRC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const DST: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn udp4(len: usize, id: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(SRC, DST)
            .ipv4([10, 78, 0, 2], [10, 77, 0, 2], 63)
            .udp(5006, 5006);
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut v = Vec::new();
        b.write(&mut v, &payload).unwrap();
        v[18..20].copy_from_slice(&id.to_be_bytes());
        v[20] = 0; // no DF: it is fragmented
        set_ipv4_checksum(&mut v[14..34]);
        v
    }

    fn udp6(len: usize) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(SRC, DST)
            .ipv6([0xfd; 16], [0xfe; 16], 63)
            .udp(5006, 5006);
        let payload: Vec<u8> = (0..len).map(|i| (i * 13 + i / 253) as u8).collect();
        let mut v = Vec::new();
        b.write(&mut v, &payload).unwrap();
        v
    }

    /// Cuts a whole IPv4 frame into fragments with `size` payload bytes each (multiple of 8).
    fn frag4(whole: &[u8], size: usize) -> Vec<Vec<u8>> {
        let ihl = usize::from(whole[14] & 0xf) * 4;
        let payload = &whole[14 + ihl..];
        let mut out = Vec::new();
        let mut at = 0;
        while at < payload.len() {
            let n = size.min(payload.len() - at);
            let more = at + n < payload.len();
            let mut f = whole[..14 + ihl].to_vec();
            f.extend(&payload[at..at + n]);
            f[16..18].copy_from_slice(&((ihl + n) as u16).to_be_bytes());
            let v = (at / 8) as u16 | if more { 0x2000 } else { 0 };
            f[20..22].copy_from_slice(&v.to_be_bytes());
            set_ipv4_checksum(&mut f[14..14 + ihl]);
            out.push(f);
            at += n;
        }
        out
    }

    /// Cuts a whole IPv6 frame (no extension headers) into fragments.
    fn frag6(whole: &[u8], size: usize, id: u32) -> Vec<Vec<u8>> {
        let payload = &whole[54..];
        let mut out = Vec::new();
        let mut at = 0;
        while at < payload.len() {
            let n = size.min(payload.len() - at);
            let more = at + n < payload.len();
            let mut f = whole[..54].to_vec();
            f[18..20].copy_from_slice(&((8 + n) as u16).to_be_bytes());
            f[20] = IPPROTO_FRAGMENT;
            f.push(whole[20]);
            f.push(0);
            f.extend(((at as u16) | u16::from(more)).to_be_bytes());
            f.extend(id.to_be_bytes());
            f.extend(&payload[at..at + n]);
            out.push(f);
            at += n;
        }
        out
    }

    fn offer(r: &mut Reassembler, now: Instant, f: &[u8]) -> Outcome {
        r.offer(now, &f[..f.len().min(HEAD)], f.len(), |from, dst| {
            dst.copy_from_slice(&f[from..from + dst.len()])
        })
    }

    /// Offers every fragment; returns the reassembled frame.
    fn run(r: &mut Reassembler, frags: &[Vec<u8>]) -> Option<Vec<u8>> {
        let now = Instant::now();
        let mut out = None;
        for f in frags {
            match offer(r, now, f) {
                Outcome::Complete(i) => {
                    out = Some(r.datagram(i).to_vec());
                    r.release(i);
                }
                Outcome::Held => {}
                o => panic!("unexpected {o:?}"),
            }
        }
        out
    }

    #[test]
    fn ipv4_and_ipv6_datagrams_come_back_whole_in_any_order() {
        let mut r = Reassembler::new();
        for len in [1473, 8000, 60000, 65507] {
            let whole = udp4(len, len as u16);
            let mut frags = frag4(&whole, 1480);
            assert!(run(&mut r, &frags).unwrap() == whole, "{len}");
            frags.reverse();
            assert!(run(&mut r, &frags).unwrap() == whole, "{len} reversed");
            let half = frags.len() / 2;
            frags.rotate_left(half);
            assert!(run(&mut r, &frags).unwrap() == whole, "{len} rotated");
        }
        for len in [2000, 60000] {
            let whole = udp6(len);
            let mut frags = frag6(&whole, 1448, 77);
            assert!(run(&mut r, &frags).unwrap() == whole, "v6 {len}");
            frags.reverse();
            assert!(run(&mut r, &frags).unwrap() == whole, "v6 {len} reversed");
        }
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn the_sniff_finds_every_fragment() {
        let whole = udp4(3000, 1);
        assert!(!may_be_fragment(&whole));
        assert!(frag4(&whole, 1480).iter().all(|f| may_be_fragment(f)));
        let w6 = udp6(3000);
        assert!(!may_be_fragment(&w6));
        assert!(frag6(&w6, 1448, 1).iter().all(|f| may_be_fragment(f)));
        assert!(!may_be_fragment(&whole[..SNIFF - 1]));
    }

    #[test]
    fn non_fragments_pass() {
        let mut r = Reassembler::new();
        let now = Instant::now();
        assert_eq!(offer(&mut r, now, &udp4(100, 1)), Outcome::NotFragment);
        assert_eq!(offer(&mut r, now, &udp6(100)), Outcome::NotFragment);
        // An atomic fragment is a whole datagram.
        let whole = udp6(100);
        let f = &frag6(&whole, 2000, 5)[0];
        assert_eq!(offer(&mut r, now, f), Outcome::NotFragment);
        let mut vlan = frag4(&udp4(3000, 2), 1480)[0].clone();
        vlan[12..14].copy_from_slice(&[0x81, 0]);
        assert_eq!(offer(&mut r, now, &vlan), Outcome::NotFragment);
        assert_eq!(offer(&mut r, now, &[0u8; 20]), Outcome::NotFragment);
    }

    #[test]
    fn duplicates_are_dropped_and_overlaps_discard_the_datagram() {
        let mut r = Reassembler::new();
        let now = Instant::now();
        let whole = udp4(4000, 9);
        let frags = frag4(&whole, 1480);
        assert_eq!(offer(&mut r, now, &frags[0]), Outcome::Held);
        assert_eq!(offer(&mut r, now, &frags[0]), Outcome::Duplicate);
        assert_eq!(offer(&mut r, now, &frags[1]), Outcome::Held);
        assert!(matches!(
            offer(&mut r, now, &frags[2]),
            Outcome::Complete(_)
        ));
        // An overlapping fragment (IPv4, conservative; IPv6, RFC 5722).
        let mut r = Reassembler::new();
        let small = frag4(&whole, 8 * 100);
        let big = frag4(&whole, 1480);
        assert_eq!(offer(&mut r, now, &big[0]), Outcome::Held);
        assert_eq!(
            offer(&mut r, now, &small[1]),
            Outcome::Discarded(Discard::Overlap)
        );
        assert_eq!(r.pending(), 0);
        // What arrives after the discard starts a new datagram (and never completes it wrongly).
        assert_eq!(offer(&mut r, now, &big[1]), Outcome::Held);
        let w6 = udp6(3000);
        let a = frag6(&w6, 1448, 1);
        let b = frag6(&w6, 800, 1);
        assert_eq!(offer(&mut r, now, &a[0]), Outcome::Held);
        assert_eq!(
            offer(&mut r, now, &b[1]),
            Outcome::Discarded(Discard::Overlap)
        );
    }

    #[test]
    fn bad_fragments_discard_the_datagram() {
        let now = Instant::now();
        let whole = udp4(4000, 3);
        let frags = frag4(&whole, 1480);
        // Not a multiple of 8 with more to come.
        let mut f = frags[0].clone();
        f.pop();
        let ip_len = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&ip_len.to_be_bytes());
        let mut r = Reassembler::new();
        assert_eq!(
            offer(&mut r, now, &f),
            Outcome::Discarded(Discard::Malformed)
        );
        // Two different ends.
        let mut r = Reassembler::new();
        let last = frags.last().unwrap().clone();
        let mut early_end = frags[1].clone();
        early_end[20] &= !0x20;
        assert_eq!(offer(&mut r, now, &last), Outcome::Held);
        assert_eq!(
            offer(&mut r, now, &early_end),
            Outcome::Discarded(Discard::Malformed)
        );
        // Beyond 65535 bytes.
        let mut r = Reassembler::new();
        let mut far = frags[1].clone();
        far[20..22].copy_from_slice(&(0x2000u16 | 8190).to_be_bytes());
        assert_eq!(
            offer(&mut r, now, &far),
            Outcome::Discarded(Discard::Malformed)
        );
        // ECN: Not-ECT with CE.
        let mut r = Reassembler::new();
        let mut ce = frags[0].clone();
        ce[15] |= 3;
        set_ipv4_checksum(&mut ce[14..34]);
        assert_eq!(offer(&mut r, now, &ce), Outcome::Held);
        assert_eq!(offer(&mut r, now, &frags[1]), Outcome::Held);
        assert_eq!(
            offer(&mut r, now, &frags[2]),
            Outcome::Discarded(Discard::Malformed)
        );
        // A fragment whose IP length exceeds the frame is not taken.
        let mut r = Reassembler::new();
        let f = &frags[0];
        assert_eq!(
            r.offer(now, &f[..HEAD], f.len() - 10, |_, _| {}),
            Outcome::NotFragment
        );
        // Too many fragments.
        let mut r = Reassembler::new();
        let tiny = frag4(&udp4(8 * 200, 4), 8);
        let mut last = Outcome::Held;
        for f in &tiny[..MAX_FRAGS + 1] {
            last = offer(&mut r, now, f);
        }
        assert_eq!(last, Outcome::Discarded(Discard::Malformed));
    }

    #[test]
    fn datagrams_expire_and_a_full_table_evicts_the_oldest() {
        let mut r = Reassembler::new();
        let t0 = Instant::now();
        for id in 0..SLOTS as u16 {
            let f = &frag4(&udp4(3000, id), 1480)[0];
            assert_eq!(offer(&mut r, t0, f), Outcome::Held);
        }
        assert_eq!(r.pending(), SLOTS);
        let f = &frag4(&udp4(3000, 999), 1480)[0];
        assert_eq!(offer(&mut r, t0 + Duration::from_secs(1), f), Outcome::Held);
        assert_eq!(r.take_lost().evicted, 1);
        let f = &frag4(&udp4(3000, 1000), 1480)[0];
        assert_eq!(
            offer(&mut r, t0 + Duration::from_secs(31), f),
            Outcome::Held
        );
        let lost = r.take_lost();
        // All but the one started a second later.
        assert_eq!(lost.timed_out, SLOTS as u64 - 1, "{lost:?}");
        assert_eq!(r.pending(), 2);
    }

    #[test]
    fn too_big_datagrams_are_split_to_the_mtu() {
        let mut r = Reassembler::new();
        let now = Instant::now();
        for whole in [udp4(65507, 7), udp6(65500)] {
            let v6 = whole[12] == 0x86;
            let frags = if v6 {
                frag6(&whole, 1448, 3)
            } else {
                frag4(&whole, 1480)
            };
            let mut slot = None;
            for f in &frags {
                if let Outcome::Complete(i) = offer(&mut r, now, f) {
                    slot = Some(i);
                }
            }
            let slot = slot.unwrap();
            let mut pieces: Vec<Vec<u8>> = Vec::new();
            let n = r.split(slot, 65520, |len, fill| {
                let mut v = vec![0u8; len];
                fill(&mut v);
                pieces.push(v);
                true
            });
            r.release(slot);
            assert_eq!(n, 2);
            for p in &pieces {
                assert!(p.len() - ETH_HLEN <= 65520, "{}", p.len());
                assert!(SlicedPacket::from_ethernet(p).is_ok());
            }
            // The pieces reassemble to the datagram again.
            assert!(run(&mut r, &pieces).unwrap() == whole, "pieces reassembled");
        }
    }

    #[test]
    fn uncopied_ipv4_options_leave_later_fragments() {
        // Record route (7, not copied), then a copied option (0x83, loose source route).
        let mut opts = [7, 7, 4, 0, 0, 0, 0, 0x83, 3, 0, 0, 0];
        strip_uncopied_options(&mut opts);
        assert_eq!(opts, [1, 1, 1, 1, 1, 1, 1, 0x83, 3, 0, 0, 0]);
        let mut bad = [7, 200, 0];
        strip_uncopied_options(&mut bad);
        assert_eq!(bad, [1, 1, 1]);
    }
}
