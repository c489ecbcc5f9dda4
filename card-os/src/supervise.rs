//! `card-os run`: the node as a long-running service (`card-os@<card>.service`). It brings the
//! node up, then follows the card's namespace over netlink (`rtnetlink` on tokio): when the
//! daemon creates its tap (socket activation: when the VMM connects) or creates it again
//! (a restart after a clean exit), or someone deletes the card's addresses or routes, it puts
//! them back. SIGHUP reloads the file (`reload`), SIGTERM and SIGINT take the node down
//! (`down`) and end the process with status 0. tokio runs only this control plane, never the
//! data path (that is vhost-card's, a separate process).

use std::path::Path;
use std::time::Duration;

use crate::error::{Context, Error, Result};
use crate::fail;
use futures::StreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::RouteNetlinkMessage;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::link::{self, State};
use crate::node;

fn log(msg: &str) {
    eprintln!("card-os: {msg}");
}

fn notify(state: &[sd_notify::NotifyState]) {
    // Outside systemd (no NOTIFY_SOCKET) this does nothing.
    sd_notify::notify(state).ok();
}

/// Runs `f` on a thread of its own (it may run its own netlink runtime), waiting for it.
fn blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("card-os worker thread panicked"))
}

pub fn run(path: &Path) -> Result<()> {
    let cfg = Config::load(path)?;
    let report = node::up(&cfg)?;
    for line in &report.lines {
        log(line);
    }
    log(&format!(
        "card {} up; following {} in namespace {}",
        cfg.name,
        cfg.tap(),
        cfg.netns()
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(follow(cfg.clone(), path));
    let cfg = match result {
        Ok(cfg) => cfg,
        Err(e) => {
            log(&format!("{e}; taking the node down"));
            node::down(&cfg).ok();
            return Err(e);
        }
    };
    notify(&[sd_notify::NotifyState::Stopping]);
    let how = node::down(&cfg)?;
    log(&format!("card {}: {how}", cfg.name));
    Ok(())
}

/// The event loop; returns the config in force when SIGTERM or SIGINT came.
async fn follow(mut cfg: Config, path: &Path) -> Result<Config> {
    let (handle, mut events) = link::open(cfg.netns(), true)?;
    let mut index = match link::apply(&handle, &cfg).await? {
        State::Ready { index } => Some(index),
        State::Absent => None,
    };
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    notify(&[sd_notify::NotifyState::Ready]);
    loop {
        tokio::select! {
            event = events.next() => {
                let Some((msg, _)) = event else {
                    fail!("the netlink event stream ended");
                };
                let NetlinkPayload::InnerMessage(msg) = msg.payload else { continue };
                if let RouteNetlinkMessage::DelLink(l) = &msg {
                    if l.attributes.iter().any(|a| matches!(a, LinkAttribute::IfName(n) if n == cfg.tap())) {
                        log(&format!("{} is gone (the daemon stopped); waiting for it to come back", cfg.tap()));
                        index = None;
                    }
                    continue;
                }
                if !link::needs_apply(&msg, cfg.tap(), index) {
                    continue;
                }
                // Let the burst of events a new link brings settle, then set it up once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while events.try_recv().is_ok() {}
                match link::apply(&handle, &cfg).await {
                    Ok(State::Ready { index: i }) => {
                        log(&format!(
                            "{} (index {i}) {}: addresses {} {} and {} route(s) set",
                            cfg.tap(),
                            if Some(i) == index { "changed" } else { "appeared" },
                            cfg.link.address4,
                            cfg.link.address6,
                            cfg.link.routes.len()
                        ));
                        index = Some(i);
                    }
                    Ok(State::Absent) => index = None,
                    Err(e) => log(&format!("setting up {}: {e}", cfg.tap())),
                }
            }
            _ = hup.recv() => {
                notify(&[sd_notify::NotifyState::Reloading]);
                let result = Config::load(path)
                    .map_err(Error::from)
                    .and_then(|new| blocking(|| node::reload(&new)).map(|r| (new, r)));
                match result {
                    Ok((new, report)) => {
                        log(&format!("SIGHUP: reloaded {}: {report}", path.display()));
                        cfg = new;
                        if let Ok(State::Ready { index: i }) = link::apply(&handle, &cfg).await {
                            index = Some(i);
                        }
                    }
                    Err(e) => log(&format!("SIGHUP: {e}; the node keeps its previous config")),
                }
                notify(&[sd_notify::NotifyState::Ready]);
            }
            _ = term.recv() => { log("SIGTERM: taking the node down"); return Ok(cfg); }
            _ = int.recv() => { log("SIGINT: taking the node down"); return Ok(cfg); }
        }
    }
}
