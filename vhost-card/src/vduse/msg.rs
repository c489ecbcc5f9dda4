//! The device's messages: requests read from /dev/vduse/NAME and the responses written back
//! (`struct vduse_dev_request` / `struct vduse_dev_response`). Pure: parsed from and built into
//! byte arrays, every field checked.

use super::uapi::MSG_SIZE;

/// `enum vduse_req_type`.
const GET_VQ_STATE: u32 = 0;
const SET_STATUS: u32 = 1;
const UPDATE_IOTLB: u32 = 2;

/// Offset of the request's union (after type, request_id and four reserved words).
const BODY: usize = 24;

/// `VDUSE_REQ_RESULT_OK` / `VDUSE_REQ_RESULT_FAILED`.
pub const RESULT_OK: u32 = 0;
pub const RESULT_FAILED: u32 = 1;

/// A request from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The driver (vhost-vdpa, a suspend) wants queue `index`'s next available index.
    GetVqState { id: u32, index: u32 },
    /// The driver wrote the device status (0: reset).
    SetStatus { id: u32, status: u8 },
    /// The IOTLB changed over `[start, last]`: mappings there are stale.
    UpdateIotlb { id: u32, start: u64, last: u64 },
    /// A request type this daemon does not know; answered FAILED.
    Unknown { id: u32, kind: u32 },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

impl Request {
    /// Parses one request; `None` when `b` is not a whole request.
    pub fn parse(b: &[u8]) -> Option<Request> {
        if b.len() != MSG_SIZE {
            return None;
        }
        let kind = u32_at(b, 0);
        let id = u32_at(b, 4);
        Some(match kind {
            GET_VQ_STATE => Request::GetVqState {
                id,
                index: u32_at(b, BODY),
            },
            SET_STATUS => Request::SetStatus {
                id,
                status: b[BODY],
            },
            UPDATE_IOTLB => Request::UpdateIotlb {
                id,
                start: u64_at(b, BODY),
                last: u64_at(b, BODY + 8),
            },
            kind => Request::Unknown { id, kind },
        })
    }

    pub fn id(&self) -> u32 {
        match *self {
            Request::GetVqState { id, .. }
            | Request::SetStatus { id, .. }
            | Request::UpdateIotlb { id, .. }
            | Request::Unknown { id, .. } => id,
        }
    }
}

/// A response: `result`, and for GET_VQ_STATE the queue's index and next available index.
pub fn response(id: u32, result: u32, vq_state: Option<(u32, u16)>) -> [u8; MSG_SIZE] {
    let mut b = [0u8; MSG_SIZE];
    b[0..4].copy_from_slice(&id.to_ne_bytes());
    b[4..8].copy_from_slice(&result.to_ne_bytes());
    if let Some((index, avail)) = vq_state {
        b[BODY..BODY + 4].copy_from_slice(&index.to_ne_bytes());
        b[BODY + 4..BODY + 6].copy_from_slice(&avail.to_ne_bytes());
    }
    b
}

/// The device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;

    /// The status bits by name, for the log.
    pub fn describe(s: u8) -> String {
        if s == 0 {
            return "reset".into();
        }
        [
            (ACKNOWLEDGE, "ACKNOWLEDGE"),
            (DRIVER, "DRIVER"),
            (FEATURES_OK, "FEATURES_OK"),
            (DRIVER_OK, "DRIVER_OK"),
            (NEEDS_RESET, "NEEDS_RESET"),
            (FAILED, "FAILED"),
        ]
        .iter()
        .filter(|(b, _)| s & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u32, id: u32, body: &[u8]) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        b[0..4].copy_from_slice(&kind.to_ne_bytes());
        b[4..8].copy_from_slice(&id.to_ne_bytes());
        b[BODY..BODY + body.len()].copy_from_slice(body);
        b
    }

    #[test]
    fn parses_each_kind() {
        assert_eq!(
            Request::parse(&req(1, 7, &[0x0f])),
            Some(Request::SetStatus {
                id: 7,
                status: 0x0f
            })
        );
        assert_eq!(
            Request::parse(&req(0, 8, &3u32.to_ne_bytes())),
            Some(Request::GetVqState { id: 8, index: 3 })
        );
        let mut body = Vec::new();
        body.extend_from_slice(&0x1000u64.to_ne_bytes());
        body.extend_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(
            Request::parse(&req(2, 9, &body)),
            Some(Request::UpdateIotlb {
                id: 9,
                start: 0x1000,
                last: u64::MAX
            })
        );
        assert_eq!(
            Request::parse(&req(77, 1, &[])),
            Some(Request::Unknown { id: 1, kind: 77 })
        );
        assert_eq!(Request::parse(&[0u8; 10]), None);
    }

    #[test]
    fn response_layout() {
        let r = response(5, RESULT_OK, Some((1, 0x1234)));
        assert_eq!(&r[0..4], &5u32.to_ne_bytes());
        assert_eq!(&r[4..8], &0u32.to_ne_bytes());
        assert_eq!(&r[24..28], &1u32.to_ne_bytes());
        assert_eq!(&r[28..30], &0x1234u16.to_ne_bytes());
        assert!(r[8..24].iter().all(|b| *b == 0));
    }

    #[test]
    fn status_names() {
        assert_eq!(status::describe(0), "reset");
        assert_eq!(
            status::describe(0x0f),
            "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK"
        );
    }
}
