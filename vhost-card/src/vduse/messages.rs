//! The device's message channel: requests read from /dev/vduse/NAME (non-blocking, polled) and
//! the answers written back, for a session or for a device nobody serves.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::msg::{self, Request, RESULT_FAILED, RESULT_OK};
use super::session::Session;
use super::uapi::{self, MSG_SIZE};
use crate::poll::{readable_or_stop, Woke};

/// Serves the device's messages until `exit` is written: reads each request from the device
/// file (non-blocking, polled) and writes the answer.
pub fn message_loop(session: &Mutex<Session>, dev: &File, exit: &EventFd) -> io::Result<()> {
    let lock = || session.lock().unwrap_or_else(|p| p.into_inner());
    pump(dev, exit, &mut |req| lock().handle(req), &mut || {
        lock().after_reply()
    })
}

/// Reads requests from `dev` until `exit` is written, answering each with `answer`.
fn pump(
    dev: &File,
    exit: &EventFd,
    answer: &mut dyn FnMut(Request) -> [u8; MSG_SIZE],
    after: &mut dyn FnMut(),
) -> io::Result<()> {
    let mut buf = [0u8; MSG_SIZE];
    loop {
        match readable_or_stop(dev.as_raw_fd(), exit.as_raw_fd())? {
            Woke::Stop => return Ok(()),
            Woke::Ready(revents) if revents & libc::POLLERR != 0 => {
                return Err(io::Error::other(
                    "the kernel marked the VDUSE device broken (a request timed out)",
                ))
            }
            Woke::Ready(_) => {}
        }
        // SAFETY: reads at most MSG_SIZE bytes into `buf`, which outlives the call.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), MSG_SIZE) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                continue;
            }
            return Err(e);
        }
        let Some(req) = usize::try_from(n)
            .ok()
            .and_then(|n| Request::parse(&buf[..n]))
        else {
            warn!("short VDUSE request ({n} bytes): ignored");
            continue;
        };
        debug!("request {req:?}");
        let resp = answer(req);
        // SAFETY: writes MSG_SIZE bytes from `resp`, which outlives the call.
        let w = unsafe { libc::write(dev.as_raw_fd(), resp.as_ptr().cast(), MSG_SIZE) };
        if w < 0 {
            warn!(
                "answering VDUSE request {}: {}",
                req.id(),
                io::Error::last_os_error()
            );
        }
        after();
    }
}

/// Answers every request of a device nobody serves (no rings): statuses and IOTLB updates are
/// acknowledged, queue states read from the kernel. Used while a device is taken apart.
pub fn answer_all(dev: &File, exit: &EventFd) -> io::Result<()> {
    let mut nobody = Bare { dev };
    pump(dev, exit, &mut |req| nobody.handle(req), &mut || {})
}

struct Bare<'a> {
    dev: &'a File,
}

impl Bare<'_> {
    fn handle(&mut self, req: Request) -> [u8; MSG_SIZE] {
        match req {
            Request::GetVqState { id, index } => match uapi::vq_get_info(self.dev, index) {
                Ok(i) => msg::response(id, RESULT_OK, Some((index, i.avail_index))),
                Err(_) => msg::response(id, RESULT_FAILED, None),
            },
            Request::Unknown { id, .. } => msg::response(id, RESULT_FAILED, None),
            r => msg::response(r.id(), RESULT_OK, None),
        }
    }
}
