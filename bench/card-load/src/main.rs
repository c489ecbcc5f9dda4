//! `card-load`: the load generator and helpers behind `cargo xtask bench`.
//!
//! ```text
//! card-load h2c  --socket S [--queues Q] [--size N] [--gso none|udp] [--ring R] ...
//! card-load c2h  --socket S [--queues Q] [--buf B] [--ring R]
//! card-load bidi --socket S [--queues Q] [--sizes N,N,...] [--buf B] [--ring R] --dst-mac M ...
//! card-load sink --netns NS --addr IP:PORT [--threads T]
//! card-load send --netns NS --src IP --dst IP:PORT (--size N | --sizes N,N,...) [--gso-seg G]
//!                [--flows F]
//! card-load inject --netns NS --tap NAME [--size N] [--threads T] [--flows F]
//! card-load tapw --netns NS --tap NAME [--queues Q] --size N [--gso none|udp] --dst-mac M ...
//! card-load tapr --netns NS --tap NAME [--queues Q]
//! card-load memcpy --size N [--threads T] [--seconds S]
//! ```
//!
//! `h2c`/`c2h` are a vhost-user frontend (the test harness's control plane and memfd guest memory
//! with rings that keep the queues full); `sink`/`send` are the card-side UDP endpoints,
//! `inject` the card-side AF_PACKET producer of the overhead group;
//! `tapw`/`tapr` the raw tap reference (no virtio at all); `bidi` is `h2c` and `c2h` at once on one
//! device (the soak's frontend), with frames of several sizes interleaved. Every long-running mode
//! reads commands on stdin: `snap` prints one JSON line of cumulative counters (`frames`, `bytes`,
//! `ns`; `bidi`: `tx_frames`, `tx_bytes`, `rx_frames`, `rx_bytes`, `ns`), `quit` (or end of input)
//! stops it.

mod driver;
mod inject;
mod ring;
mod tools;

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};

use crate::driver::{Counts, Device};

/// `card-load MODE --option value ...`
#[derive(Parser)]
#[command(
    name = "card-load",
    about = "The load generator behind `cargo xtask bench` and `soak` (long-running modes read \
             `snap` and `quit` on stdin)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Host-to-card frames from a vhost-user frontend that keeps the TX rings full.
    H2c {
        #[command(flatten)]
        dev: DevOpts,
        #[command(flatten)]
        frame: tools::FrameOpts,
        /// Distinct frame buffers per queue, up to this working set (KiB).
        #[arg(long, default_value_t = 1024)]
        ws_kib: usize,
    },
    /// Card-to-host frames into a vhost-user frontend that keeps the RX rings posted.
    C2h {
        #[command(flatten)]
        dev: DevOpts,
        #[command(flatten)]
        rx: RxOpts,
    },
    /// Both at once on one device, frames of several sizes interleaved (the soak's frontend).
    Bidi {
        #[command(flatten)]
        dev: DevOpts,
        #[command(flatten)]
        rx: RxOpts,
        #[command(flatten)]
        frame: tools::FrameOpts,
        /// Frame sizes, Ethernet header included (default: --size alone).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 1024)]
        ws_kib: usize,
    },
    /// UDP sink inside the card's namespace.
    Sink(tools::SinkOpts),
    /// UDP sender inside the card's namespace.
    Send(tools::SendOpts),
    /// Frames into the card's tap from an AF_PACKET socket (the overhead group's producer).
    Inject(inject::InjectOpts),
    /// Raw tap writer (the reference without virtio).
    Tapw {
        #[command(flatten)]
        tap: tools::TapOpts,
        #[command(flatten)]
        frame: tools::FrameOpts,
    },
    /// Raw tap reader.
    Tapr(tools::TapOpts),
    /// The memcpy reference.
    Memcpy(tools::MemcpyOpts),
}

/// The vhost-user device.
#[derive(clap::Args)]
struct DevOpts {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// Queue pairs.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Ring size.
    #[arg(long, default_value_t = 1024)]
    ring: u16,
    /// Guest memory (MiB); default 512 for h2c, 256 otherwise.
    #[arg(long)]
    mem_mib: Option<usize>,
}

/// The RX side.
#[derive(clap::Args)]
struct RxOpts {
    /// RX buffer size with MRG_RXBUF (without it, 65550).
    #[arg(long, default_value_t = 4096)]
    buf: u32,
    /// How long an idle RX ring is polled before the thread sleeps on the call eventfd (us).
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
}

/// The driver's MAC address (the "host").
pub const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xbe, 0x4c, 0x01];

fn main() {
    let cli = Cli::parse();
    let r = match &cli.mode {
        Mode::H2c { dev, frame, ws_kib } => h2c(dev, frame, *ws_kib),
        Mode::C2h { dev, rx } => c2h(dev, rx),
        Mode::Bidi {
            dev,
            rx,
            frame,
            sizes,
            ws_kib,
        } => bidi(dev, rx, frame, sizes, *ws_kib),
        Mode::Sink(o) => tools::sink(o),
        Mode::Send(o) => tools::send(o),
        Mode::Inject(o) => inject::inject(o),
        Mode::Tapw { tap, frame } => tools::tap_write(tap, frame),
        Mode::Tapr(o) => tools::tap_read(o),
        Mode::Memcpy(o) => tools::memcpy(o),
    };
    if let Err(e) = r {
        eprintln!("card-load: {e:#}");
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

fn h2c(d: &DevOpts, frame: &tools::FrameOpts, ws_kib: usize) -> Result<()> {
    let pairs = d.queues;
    let mut dev = Device::start(&d.socket, pairs, d.ring, d.mem_mib.unwrap_or(512))?;
    let spec = tools::FrameSpec::from_opts(frame)?;
    let wire = spec.wire_bytes() as u64;
    // Distinct frame buffers per queue, up to this working set (1 MiB: about a core's L2).
    let per_queue = ws_kib << 10;
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

fn c2h(d: &DevOpts, rx: &RxOpts) -> Result<()> {
    let pairs = d.queues;
    let spin = std::time::Duration::from_micros(rx.spin_us);
    let mut dev = Device::start(&d.socket, pairs, d.ring, d.mem_mib.unwrap_or(256))?;
    let mrg = dev.features & card_tests::netdev::F_MRG_RXBUF != 0;
    let buf = if mrg { rx.buf } else { 65550 };
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
fn bidi(
    d: &DevOpts,
    rx_opts: &RxOpts,
    frame: &tools::FrameOpts,
    sizes: &[usize],
    ws_kib: usize,
) -> Result<()> {
    let pairs = d.queues;
    let spin = std::time::Duration::from_micros(rx_opts.spin_us);
    let per_queue = ws_kib << 10;
    let sizes = tools::sizes(frame.size, sizes)?;
    let spec = tools::FrameSpec::from_opts(frame)?;
    let mut dev = Device::start(&d.socket, pairs, d.ring, d.mem_mib.unwrap_or(256))?;
    let mrg = dev.features & card_tests::netdev::F_MRG_RXBUF != 0;
    let buf = if mrg { rx_opts.buf } else { 65550 };
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
