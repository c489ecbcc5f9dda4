//! Frames the card itself makes for the host (ARP replies, neighbour advertisements, reassembled
//! datagrams), waiting for the RX path to put them into the host's buffers. One fixed arena per
//! queue pair, allocated once: frames are appended, and the arena starts over when it is empty
//! (the RX path drains it at every pass the host has buffers for). A frame that does not fit is
//! refused, and the caller counts it.

use std::collections::VecDeque;

pub struct LocalFrames {
    buf: Vec<u8>,
    frames: VecDeque<(usize, usize)>,
    max_frames: usize,
    end: usize,
}

impl LocalFrames {
    /// An arena of `bytes` bytes holding at most `max_frames` frames.
    pub fn new(bytes: usize, max_frames: usize) -> Self {
        LocalFrames {
            buf: vec![0; bytes],
            frames: VecDeque::with_capacity(max_frames),
            max_frames,
            end: 0,
        }
    }

    /// Appends a frame of `len` bytes written by `fill`; false (nothing queued) when it does not
    /// fit.
    pub fn push_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        if self.frames.len() == self.max_frames || self.buf.len() - self.end < len {
            return false;
        }
        fill(&mut self.buf[self.end..self.end + len]);
        self.frames.push_back((self.end, len));
        self.end += len;
        true
    }

    /// The oldest frame.
    pub fn front(&self) -> Option<&[u8]> {
        self.frames
            .front()
            .map(|&(at, len)| &self.buf[at..at + len])
    }

    /// Drops the oldest frame.
    pub fn pop(&mut self) {
        self.frames.pop_front();
        if self.frames.is_empty() {
            self.end = 0;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Forgets every frame.
    pub fn clear(&mut self) {
        self.frames.clear();
        self.end = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_in_order_and_the_arena_is_bounded() {
        let mut q = LocalFrames::new(100, 3);
        assert!(q.push_with(40, |b| b.fill(1)));
        assert!(q.push_with(40, |b| b.fill(2)));
        assert!(!q.push_with(40, |b| b.fill(3)), "beyond the arena");
        assert!(q.push_with(20, |b| b.fill(4)));
        assert!(!q.push_with(1, |b| b.fill(5)), "beyond the frame count");
        assert_eq!(q.len(), 3);
        assert_eq!(q.front(), Some(&[1u8; 40][..]));
        q.pop();
        assert_eq!(q.front(), Some(&[2u8; 40][..]));
        q.pop();
        q.pop();
        assert!(q.is_empty() && q.front().is_none());
        // Empty again: the whole arena is free.
        assert!(q.push_with(100, |b| b.fill(6)));
        q.clear();
        assert!(q.is_empty());
    }
}
