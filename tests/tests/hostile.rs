//! A hostile or broken frontend on the vhost-user socket: every malformed or out-of-order
//! request ends in an error reply or a closed session, never in a crash, and the daemon serves
//! the next frontend normally.

use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use card_tests::card::Card;
use card_tests::fds::memfd;
use card_tests::frontend::{Control, FLAG_NEED_REPLY};

const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;

/// How the daemon answered a bad request.
#[derive(Debug)]
enum Outcome {
    /// A non-zero REPLY_ACK.
    ErrorReply,
    Closed,
}

/// Sends a request that must be refused: a non-zero REPLY_ACK or a closed connection pass, an
/// ack of 0 (accepted) or silence with the connection open fail.
fn refused(ctl: &mut Control, req: u32, body: &[u8], fds: &[i32]) -> Result<Outcome> {
    match ctl.raw_request_fds(req, FLAG_NEED_REPLY, body, fds) {
        Ok(Some(0)) => bail!("request {req} with a bad body was accepted"),
        Ok(Some(_)) => Ok(Outcome::ErrorReply),
        Ok(None) => unreachable!("NEED_REPLY was set"),
        Err(_) if ctl.closed_by_peer(Duration::from_secs(2)) => Ok(Outcome::Closed),
        Err(e) => Err(e).context(format!("request {req}: neither a reply nor a close")),
    }
}

/// A SET_MEM_TABLE body: (guest address, size, user address, mmap offset) per region.
fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&u32::try_from(regions.len()).unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, size, uva, off) in regions {
        for v in [gpa, size, uva, off] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

/// One bad request on a fresh session, after the usual opening.
fn try_one(card: &Card, what: &str, f: impl FnOnce(&mut Control) -> Result<Outcome>) -> Result<()> {
    let mut ctl = card.connect()?;
    ctl.handshake()?;
    let outcome = f(&mut ctl).with_context(|| what.to_string())?;
    eprintln!("{what}: {outcome:?}");
    drop(ctl);
    // The daemon is still there and serves the next frontend.
    let mut next = card.connect()?;
    next.handshake()
        .with_context(|| format!("a new frontend after '{what}'"))?;
    Ok(())
}

#[test]
fn bad_requests_are_refused_and_the_daemon_keeps_serving() -> Result<()> {
    let card = Card::start(&[])?;
    let mib = 1 << 20;
    let fd = memfd(2 * mib)?;
    let raw = fd.as_raw_fd();

    try_one(&card, "overlapping memory regions", |c| {
        refused(
            c,
            SET_MEM_TABLE,
            &mem_table(&[
                (0, mib, 0x7000_0000_0000, 0),
                (mib / 2, mib, 0x7100_0000_0000, 0),
            ]),
            &[raw, raw],
        )
    })?;
    try_one(&card, "zero-sized memory region", |c| {
        refused(
            c,
            SET_MEM_TABLE,
            &mem_table(&[(0, 0, 0x7000_0000_0000, 0)]),
            &[raw],
        )
    })?;
    try_one(&card, "unaligned mmap offset", |c| {
        refused(
            c,
            SET_MEM_TABLE,
            &mem_table(&[(0, mib, 0x7000_0000_0000, 0x10)]),
            &[raw],
        )
    })?;
    try_one(&card, "region larger than its file", |c| {
        refused(
            c,
            SET_MEM_TABLE,
            &mem_table(&[(0, 1 << 30, 0x7000_0000_0000, 0)]),
            &[raw],
        )
    })?;
    try_one(&card, "fewer descriptors than regions", |c| {
        refused(
            c,
            SET_MEM_TABLE,
            &mem_table(&[
                (0, mib, 0x7000_0000_0000, 0),
                (mib, mib, 0x7100_0000_0000, mib),
            ]),
            &[raw],
        )
    })?;
    try_one(&card, "queue index out of range", |c| {
        refused(c, SET_VRING_NUM, &vring_state(99, 256), &[])
    })?;
    try_one(&card, "queue size not allowed", |c| {
        refused(c, SET_VRING_NUM, &vring_state(0, 65535), &[])
    })?;
    try_one(&card, "SET_VRING_ADDR outside guest memory", |c| {
        let ok = c.raw_request_fds(
            SET_MEM_TABLE,
            FLAG_NEED_REPLY,
            &mem_table(&[(0, mib, 0x7000_0000_0000, 0)]),
            &[raw],
        )?;
        ensure!(ok == Some(0), "a good memory table was refused: {ok:?}");
        let mut body = Vec::new();
        body.extend_from_slice(&0u32.to_le_bytes()); // index
        body.extend_from_slice(&0u32.to_le_bytes()); // flags
        for va in [0x7fff_0000_0000u64, 0x7fff_0000_1000, 0x7fff_0000_2000, 0] {
            body.extend_from_slice(&va.to_le_bytes());
        }
        refused(c, SET_VRING_ADDR, &body, &[])
    })?;
    try_one(&card, "features that were not offered", |c| {
        refused(c, SET_FEATURES, &(1u64 << 63 | 1 << 32).to_le_bytes(), &[])
    })?;
    try_one(&card, "SET_FEATURES with a 4-byte body", |c| {
        refused(c, SET_FEATURES, &[0u8; 4], &[])
    })?;
    try_one(&card, "SET_VRING_ENABLE with num 5", |c| {
        c.set_features(1 << 30 | 1 << 32)?;
        refused(c, SET_VRING_ENABLE, &vring_state(0, 5), &[])
    })?;
    try_one(&card, "unknown request", |c| {
        refused(c, 999, &[0u8; 8], &[])
    })?;
    try_one(&card, "message size beyond the protocol's limit", |c| {
        header_closes(c, [SET_FEATURES, 0x1 | FLAG_NEED_REPLY, 1 << 20], &[])
    })?;
    try_one(&card, "wrong protocol version in the header", |c| {
        header_closes(
            c,
            [SET_FEATURES, 0x2 | FLAG_NEED_REPLY, 8],
            &0u64.to_le_bytes(),
        )
    })?;
    try_one(&card, "half a message, then a hang-up", |c| {
        c.raw_bytes(&[2, 0, 0, 0, 1])?;
        Ok(Outcome::Closed)
    })?;

    // Out of order: GET_QUEUE_NUM before the protocol features were negotiated.
    let mut c = card.connect()?;
    let outcome = refused(&mut c, GET_QUEUE_NUM, &[], &[])?;
    eprintln!("GET_QUEUE_NUM before SET_PROTOCOL_FEATURES: {outcome:?}");
    drop(c);

    // After all that, a normal frontend still moves traffic both ways.
    let mut dev = card.driver()?;
    card.check_host_to_card(&mut dev, 7600, 3)?;
    card.check_card_to_host(&mut dev, 4)?;
    Ok(())
}

/// Sends a request header (request, flags, size) and `body`; the daemon must close the
/// connection.
fn header_closes(c: &mut Control, words: [u32; 3], body: &[u8]) -> Result<Outcome> {
    let mut msg: Vec<u8> = words.iter().flat_map(|v| v.to_le_bytes()).collect();
    msg.extend_from_slice(body);
    c.raw_bytes(&msg)?;
    ensure!(
        c.closed_by_peer(Duration::from_secs(3)),
        "connection kept open"
    );
    Ok(Outcome::Closed)
}
