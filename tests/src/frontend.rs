//! The vhost-user control plane, as a VMM drives it.
//!
//! Most requests go through the `vhost` crate's `Frontend`. The two requests QEMU sends before
//! SET_FEATURES that the crate's frontend refuses to send (SET_VRING_ENABLE before
//! PROTOCOL_FEATURES is acked) or does not know (NET_SET_MTU, request 20) are written as raw
//! messages on a second handle to the same socket. Every request is synchronous, so the two
//! never interleave.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

/// vhost-user request codes sent raw.
pub const REQ_SET_VRING_ENABLE: u32 = 18;
pub const REQ_NET_SET_MTU: u32 = 20;

/// Header flags.
pub const FLAG_VERSION: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Protocol features this frontend understands, like QEMU's net device: MQ, REPLY_ACK and
/// NET_MTU (called MTU in the `vhost` crate).
pub fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MTU
}

/// The body of SET_VRING_ENABLE: ring index and state, two u32.
fn vring_state(index: u32, enable: bool) -> [u8; 8] {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&index.to_le_bytes());
    body[4..].copy_from_slice(&u32::from(enable).to_le_bytes());
    body
}

/// What the backend offered during [`Control::handshake`].
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub acked_protocol: VhostUserProtocolFeatures,
    pub queue_num: u64,
}

/// One connection to the daemon's socket.
pub struct Control {
    pub vu: Frontend,
    raw: UnixStream,
}

impl Control {
    /// Connects, retrying for a moment while the socket is not there yet.
    pub fn connect(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => bail!("connecting to {}: {e}", path.display()),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let vu = Frontend::from_stream(stream.try_clone()?, 2);
        Ok(Control { vu, raw: stream })
    }

    /// QEMU's opening sequence (vhost_user_backend_init + vhost_dev_init): GET_FEATURES,
    /// GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, GET_FEATURES.
    /// After REPLY_ACK is acked every request asks for a reply, so errors surface at once.
    pub fn handshake(&mut self) -> Result<Offer> {
        self.handshake_with(wanted_protocol())
    }

    /// [`Control::handshake`] acking the offered protocol features among `wanted`.
    pub fn handshake_with(&mut self, wanted: VhostUserProtocolFeatures) -> Result<Offer> {
        let features = self.vu.get_features().context("GET_FEATURES")?;
        ensure!(
            features & F_PROTOCOL_FEATURES != 0,
            "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES: {features:#x}"
        );
        let protocol = self
            .vu
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        let acked_protocol = protocol & wanted;
        self.vu
            .set_protocol_features(acked_protocol)
            .context("SET_PROTOCOL_FEATURES")?;
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queue_num = if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            self.vu.get_queue_num().context("GET_QUEUE_NUM")?
        } else {
            2
        };
        self.vu.set_owner().context("SET_OWNER")?;
        let again = self.vu.get_features().context("second GET_FEATURES")?;
        ensure!(
            again == features,
            "feature offer changed: {features:#x} then {again:#x}"
        );
        Ok(Offer {
            features,
            protocol,
            acked_protocol,
            queue_num,
        })
    }

    /// Sends one raw request; with NEED_REPLY waits for the u64 reply (REPLY_ACK) and returns it.
    pub fn raw_request(&mut self, request: u32, flags: u32, body: &[u8]) -> Result<Option<u64>> {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&(flags | FLAG_VERSION).to_le_bytes());
        msg.extend_from_slice(&u32::try_from(body.len())?.to_le_bytes());
        msg.extend_from_slice(body);
        self.raw
            .write_all(&msg)
            .with_context(|| format!("sending request {request}"))?;
        if flags & FLAG_NEED_REPLY == 0 {
            return Ok(None);
        }
        let mut hdr = [0u8; 12];
        self.raw
            .read_exact(&mut hdr)
            .with_context(|| format!("no reply to request {request}"))?;
        let w = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (req, rflags, size) = (w(0), w(4), w(8));
        ensure!(req == request, "reply to request {req}, expected {request}");
        ensure!(
            rflags & FLAG_REPLY != 0 && rflags & 0x3 == FLAG_VERSION,
            "reply flags {rflags:#x}"
        );
        ensure!(size == 8, "reply body of {size} bytes");
        let mut v = [0u8; 8];
        self.raw.read_exact(&mut v)?;
        Ok(Some(u64::from_le_bytes(v)))
    }

    /// Sends one raw request with file descriptors attached; with NEED_REPLY returns the ack,
    /// or an error if the daemon closed the connection instead.
    pub fn raw_request_fds(
        &mut self,
        request: u32,
        flags: u32,
        body: &[u8],
        fds: &[std::os::fd::RawFd],
    ) -> Result<Option<u64>> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&(flags | FLAG_VERSION).to_le_bytes());
        msg.extend_from_slice(&u32::try_from(body.len())?.to_le_bytes());
        msg.extend_from_slice(body);
        let n = self
            .raw
            .send_with_fds(&[&msg[..]], fds)
            .map_err(|e| anyhow!("sendmsg: {e}"))?;
        ensure!(n == msg.len(), "short sendmsg ({n} of {})", msg.len());
        if flags & FLAG_NEED_REPLY == 0 {
            return Ok(None);
        }
        let mut reply = [0u8; 20];
        self.raw
            .read_exact(&mut reply)
            .with_context(|| format!("no reply to request {request}"))?;
        Ok(Some(u64::from_le_bytes(reply[12..20].try_into()?)))
    }

    /// Sends one raw request with file descriptors attached and reads the reply it solicits
    /// (whatever its size); returns the reply's body.
    pub fn raw_request_reply(
        &mut self,
        request: u32,
        flags: u32,
        body: &[u8],
        fds: &[std::os::fd::RawFd],
    ) -> Result<Vec<u8>> {
        ensure!(self
            .raw_request_fds(request, flags & !FLAG_NEED_REPLY, body, fds)?
            .is_none());
        let mut hdr = [0u8; 12];
        self.raw
            .read_exact(&mut hdr)
            .with_context(|| format!("no reply to request {request}"))?;
        let w = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        ensure!(
            w(0) == request,
            "reply to request {}, expected {request}",
            w(0)
        );
        let mut reply = vec![0u8; w(8) as usize];
        self.raw.read_exact(&mut reply)?;
        Ok(reply)
    }

    /// Sends raw bytes on the connection (anything: a broken header, half a message).
    pub fn raw_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.raw.write_all(bytes).context("sending raw bytes")
    }

    /// Whether the daemon closed this connection (reads end of stream within `timeout`).
    pub fn closed_by_peer(&mut self, timeout: Duration) -> bool {
        let _ = self.raw.set_read_timeout(Some(timeout));
        let mut b = [0u8; 64];
        loop {
            match self.raw.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// SET_VRING_ENABLE as a raw message with NEED_REPLY; returns the ack value.
    pub fn raw_set_vring_enable(&mut self, index: u32, enable: bool) -> Result<u64> {
        self.raw_request(
            REQ_SET_VRING_ENABLE,
            FLAG_NEED_REPLY,
            &vring_state(index, enable),
        )?
        .ok_or_else(|| anyhow!("no ack"))
    }

    /// SET_VRING_ENABLE as a raw message without NEED_REPLY, as QEMU sends it.
    pub fn raw_set_vring_enable_noreply(&mut self, index: u32, enable: bool) -> Result<()> {
        self.raw_request(REQ_SET_VRING_ENABLE, 0, &vring_state(index, enable))
            .map(drop)
    }

    /// VHOST_USER_NET_SET_MTU with NEED_REPLY; returns the ack value.
    pub fn raw_net_set_mtu(&mut self, mtu: u64) -> Result<u64> {
        self.raw_request(REQ_NET_SET_MTU, FLAG_NEED_REPLY, &mtu.to_le_bytes())?
            .ok_or_else(|| anyhow!("no ack"))
    }

    /// Sets the feature word (SET_FEATURES).
    pub fn set_features(&mut self, features: u64) -> Result<()> {
        self.vu.set_features(features).context("SET_FEATURES")
    }
}
