//! `card-load`: the load generator and helpers behind `cargo xtask bench`.
//!
//! ```text
//! card-load h2c  --socket S [--queues Q] [--size N] [--gso none|udp] [--ring R] ...
//! card-load c2h  --socket S [--queues Q] [--buf B] [--ring R]
//! card-load bidi --socket S [--queues Q] [--sizes N,N,...] [--buf B] [--ring R] --dst-mac M ...
//! card-load sink --netns NS --addr IP:PORT [--threads T]
//! card-load send --netns NS --src IP --dst IP:PORT (--size N | --sizes N,N,...) [--gso-seg G]
//!                [--flows F]
//! card-load tapw --netns NS --tap NAME [--queues Q] --size N [--gso none|udp] --dst-mac M ...
//! card-load tapr --netns NS --tap NAME [--queues Q]
//! card-load memcpy --size N [--threads T] [--seconds S]
//! ```
//!
//! `h2c`/`c2h` are a vhost-user frontend (the test harness's control plane and memfd guest memory
//! with rings that keep the queues full); `sink`/`send` are the card-side UDP endpoints;
//! `tapw`/`tapr` the raw tap reference (no virtio at all); `bidi` is `h2c` and `c2h` at once on one
//! device (the soak's frontend), with frames of several sizes interleaved. Every long-running mode
//! reads commands on stdin: `snap` prints one JSON line of cumulative counters (`frames`, `bytes`,
//! `ns`; `bidi`: `tx_frames`, `tx_bytes`, `rx_frames`, `rx_bytes`, `ns`), `quit` (or end of input)
//! stops it.

mod driver;
mod ring;
mod tools;

use std::collections::HashMap;
use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::driver::{Counts, Device};

/// `--key value` options.
pub struct Args(HashMap<String, String>);

impl Args {
    fn parse(list: &[String]) -> Result<Self> {
        let mut map = HashMap::new();
        let mut it = list.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("expected --option, got '{k}'"))?;
            let v = it.next().ok_or_else(|| anyhow!("--{key} needs a value"))?;
            map.insert(key.to_string(), v.clone());
        }
        Ok(Args(map))
    }

    pub fn str(&self, k: &str) -> Result<&str> {
        self.0
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("--{k} is required"))
    }

    pub fn opt(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    pub fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.get(k) {
            Some(v) => v.parse().map_err(|e| anyhow!("--{k} {v}: {e}")),
            None => Ok(default),
        }
    }

    pub fn sock(&self, k: &str) -> Result<SocketAddrV4> {
        self.str(k)?.parse().with_context(|| format!("--{k}"))
    }

    pub fn ip(&self, k: &str, default: Ipv4Addr) -> Result<Ipv4Addr> {
        match self.0.get(k) {
            Some(v) => v.parse().with_context(|| format!("--{k}")),
            None => Ok(default),
        }
    }

    pub fn mac(&self, k: &str) -> Result<[u8; 6]> {
        let s = self.str(k)?;
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            bail!("--{k} {s}: not a MAC address");
        }
        let mut m = [0u8; 6];
        for (d, p) in m.iter_mut().zip(parts) {
            *d = u8::from_str_radix(p, 16).with_context(|| format!("--{k} {s}"))?;
        }
        Ok(m)
    }
}

/// The driver's MAC address (the "host").
pub const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xbe, 0x4c, 0x01];

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = argv.split_first() else {
        eprintln!("usage: card-load h2c|c2h|bidi|sink|send|tapw|tapr|memcpy --option value ...");
        std::process::exit(2);
    };
    let r = Args::parse(rest).and_then(|a| match mode.as_str() {
        "h2c" => h2c(&a),
        "c2h" => c2h(&a),
        "bidi" => bidi(&a),
        "sink" => tools::sink(&a),
        "send" => tools::send(&a),
        "tapw" => tools::tap_write(&a),
        "tapr" => tools::tap_read(&a),
        "memcpy" => tools::memcpy(&a),
        m => bail!("unknown mode '{m}'"),
    });
    if let Err(e) = r {
        eprintln!("card-load {mode}: {e:#}");
        std::process::exit(1);
    }
}

/// `frames`, `bytes` and `ns` (since `t0`) of the sum of `counts`, as JSON members with `prefix`.
fn snap_members(prefix: &str, counts: &[Arc<Counts>]) -> String {
    let (f, b) = counts.iter().fold((0u64, 0u64), |(f, b), c| {
        (
            f + c.frames.load(Ordering::Relaxed),
            b.wrapping_add(c.bytes.load(Ordering::Relaxed)),
        )
    });
    format!("\"{prefix}frames\":{f},\"{prefix}bytes\":{b}")
}

/// Serves `snap` on stdin with the sum of `counts` until `quit` or end of input.
pub fn serve_snaps(counts: &[Arc<Counts>], stop: &AtomicBool) -> Result<()> {
    serve_with(stop, || snap_members("", counts))
}

/// Serves `snap` on stdin with what `members` says (and `ns`) until `quit` or end of input.
fn serve_with(stop: &AtomicBool, members: impl Fn() -> String) -> Result<()> {
    let t0 = Instant::now();
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        match line.trim() {
            "snap" => println!("{{{},\"ns\":{}}}", members(), t0.elapsed().as_nanos()),
            "quit" => break,
            "" => {}
            other => eprintln!("card-load: unknown command '{other}'"),
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    Ok(())
}

/// Runs one thread per item until `serve_snaps` returns; fails if any thread failed.
pub fn run_threads<T: Send + 'static>(
    items: Vec<T>,
    counts: &[Arc<Counts>],
    work: impl Fn(T, &Counts, &AtomicBool) -> Result<()> + Send + Sync + 'static,
) -> Result<()> {
    let all = counts.to_vec();
    run_threads_with(items, counts, move || snap_members("", &all), work)
}

/// [`run_threads`] with the `snap` answer's members from `members`.
fn run_threads_with<T: Send + 'static>(
    items: Vec<T>,
    counts: &[Arc<Counts>],
    members: impl Fn() -> String,
    work: impl Fn(T, &Counts, &AtomicBool) -> Result<()> + Send + Sync + 'static,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(work);
    let mut handles = Vec::new();
    for (item, c) in items.into_iter().zip(counts.iter().cloned()) {
        let (stop, work) = (stop.clone(), work.clone());
        handles.push(std::thread::spawn(move || {
            let r = work(item, &c, &stop);
            if r.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            r
        }));
    }
    serve_with(&stop, members)?;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| anyhow!("worker panicked"))??;
    }
    Ok(())
}

fn h2c(a: &Args) -> Result<()> {
    let socket = PathBuf::from(a.str("socket")?);
    let pairs: usize = a.num("queues", 1)?;
    let ring: u16 = a.num("ring", 1024)?;
    let mem_mib: usize = a.num("mem-mib", 512)?;
    let mut dev = Device::start(&socket, pairs, ring, mem_mib)?;
    let spec = tools::FrameSpec::from_args(a)?;
    let wire = spec.wire_bytes() as u64;
    // Distinct frame buffers per queue, up to this working set (1 MiB: about a core's L2).
    let per_queue: usize = a.num("ws-kib", 1024usize)? << 10;
    let mut wires = Vec::new();
    for q in 0..pairs {
        let f = spec.build_with_hdr(dev.hdr_len(), u16::try_from(q)?)?;
        wires.push(driver::tx_setup(
            &mut dev,
            2 * q + 1,
            &[(f, wire)],
            per_queue,
        )?);
    }
    let mut all: Vec<Option<ring::Ring>> = std::mem::take(&mut dev.rings)
        .into_iter()
        .map(Some)
        .collect();
    let rings: Vec<_> = (0..pairs)
        .filter_map(|q| all[2 * q + 1].take())
        .zip(wires)
        .collect();
    let counts: Vec<Arc<Counts>> = (0..pairs).map(|_| Arc::default()).collect();
    run_threads(rings, &counts, move |(mut r, wire), c, stop| {
        driver::tx_loop(&mut r, &wire, c, stop)
    })?;
    drop(dev);
    Ok(())
}

fn c2h(a: &Args) -> Result<()> {
    let socket = PathBuf::from(a.str("socket")?);
    let pairs: usize = a.num("queues", 1)?;
    let ring: u16 = a.num("ring", 1024)?;
    let buf: u32 = a.num("buf", 4096)?;
    // How long an idle RX ring is polled before the thread sleeps on the call eventfd.
    let spin = std::time::Duration::from_micros(a.num("spin-us", 50)?);
    let mem_mib: usize = a.num("mem-mib", 256)?;
    let mut dev = Device::start(&socket, pairs, ring, mem_mib)?;
    let mrg = dev.features & card_tests::netdev::F_MRG_RXBUF != 0;
    let buf = if mrg { buf } else { 65550 };
    let hdr_len = dev.hdr_len();
    let mut ptrs = Vec::new();
    for q in 0..pairs {
        let addrs = driver::rx_setup(&mut dev, 2 * q, buf)?;
        ptrs.push(driver::host_ptrs(&dev, &addrs)?);
    }
    let mut all: Vec<Option<ring::Ring>> = std::mem::take(&mut dev.rings)
        .into_iter()
        .map(Some)
        .collect();
    let work: Vec<_> = (0..pairs)
        .filter_map(|q| all[2 * q].take())
        .zip(ptrs)
        .collect();
    let counts: Vec<Arc<Counts>> = (0..pairs).map(|_| Arc::default()).collect();
    run_threads(work, &counts, move |(mut r, ptrs), c, stop| {
        let hdrs: Vec<*const u8> = ptrs.iter().map(|&p| p as *const u8).collect();
        driver::rx_loop(&mut r, &hdrs, hdr_len, mrg, spin, c, stop)
    })?;
    drop(dev);
    Ok(())
}

/// One thread of `bidi`: a TX ring with its descriptors' wire bytes, or an RX ring with the host
/// addresses of its buffers.
enum Work {
    Tx(ring::Ring, Vec<u64>),
    Rx(ring::Ring, Vec<usize>),
}

/// Both directions at once on one device: every queue pair's TX ring kept full of frames of
/// `--sizes` (interleaved), its RX ring of `--buf`-byte buffers recycled as they are used.
fn bidi(a: &Args) -> Result<()> {
    let socket = PathBuf::from(a.str("socket")?);
    let pairs: usize = a.num("queues", 1)?;
    let ring: u16 = a.num("ring", 1024)?;
    let buf: u32 = a.num("buf", 4096)?;
    let spin = std::time::Duration::from_micros(a.num("spin-us", 50)?);
    let mem_mib: usize = a.num("mem-mib", 256)?;
    let per_queue: usize = a.num("ws-kib", 1024usize)? << 10;
    let sizes = tools::sizes(a)?;
    let spec = tools::FrameSpec::from_args(a)?;
    let mut dev = Device::start(&socket, pairs, ring, mem_mib)?;
    let mrg = dev.features & card_tests::netdev::F_MRG_RXBUF != 0;
    let buf = if mrg { buf } else { 65550 };
    let hdr_len = dev.hdr_len();
    let mut tx = Vec::new();
    let mut rx = Vec::new();
    for q in 0..pairs {
        let mut frames = Vec::new();
        for &size in &sizes {
            let s = spec.sized(size);
            frames.push((
                s.build_with_hdr(hdr_len, u16::try_from(q)?)?,
                s.wire_bytes() as u64,
            ));
        }
        tx.push(driver::tx_setup(&mut dev, 2 * q + 1, &frames, per_queue)?);
        let addrs = driver::rx_setup(&mut dev, 2 * q, buf)?;
        rx.push(driver::host_ptrs(&dev, &addrs)?);
    }
    let mut all: Vec<Option<ring::Ring>> = std::mem::take(&mut dev.rings)
        .into_iter()
        .map(Some)
        .collect();
    let mut work = Vec::new();
    for (q, (wire, ptrs)) in tx.into_iter().zip(rx).enumerate() {
        let t = all[2 * q + 1].take().context("TX ring")?;
        let r = all[2 * q].take().context("RX ring")?;
        work.push(Work::Tx(t, wire));
        work.push(Work::Rx(r, ptrs));
    }
    // counts[2q] is TX of pair q, counts[2q + 1] its RX (the order of `work`).
    let counts: Vec<Arc<Counts>> = (0..2 * pairs).map(|_| Arc::default()).collect();
    let tx_counts: Vec<Arc<Counts>> = counts.iter().step_by(2).cloned().collect();
    let rx_counts: Vec<Arc<Counts>> = counts.iter().skip(1).step_by(2).cloned().collect();
    let members = move || {
        format!(
            "{},{}",
            snap_members("tx_", &tx_counts),
            snap_members("rx_", &rx_counts)
        )
    };
    run_threads_with(work, &counts, members, move |w, c, stop| match w {
        Work::Tx(mut r, wire) => driver::tx_loop(&mut r, &wire, c, stop),
        Work::Rx(mut r, ptrs) => {
            let hdrs: Vec<*const u8> = ptrs.iter().map(|&p| p as *const u8).collect();
            driver::rx_loop(&mut r, &hdrs, hdr_len, mrg, spin, c, stop)
        }
    })?;
    drop(dev);
    Ok(())
}
