//! A writer for the "newc" cpio format, the one the kernel unpacks as an
//! initramfs. Entries are written in order; parents must come first.

pub struct Archive {
    buf: Vec<u8>,
    next_ino: u32,
    /// uid and gid of the entry being written.
    owner: (u32, u32),
}

const TYPE_MASK: u32 = 0o170_000;
const DIR: u32 = 0o040_000;
const FILE: u32 = 0o100_000;
const SYMLINK: u32 = 0o120_000;
const CHAR_DEV: u32 = 0o020_000;

impl Default for Archive {
    fn default() -> Self {
        Archive::new()
    }
}

impl Archive {
    pub fn new() -> Self {
        Archive {
            buf: Vec::new(),
            next_ino: 1,
            owner: (0, 0),
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.entry(path, DIR | 0o755, b"", (0, 0));
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, FILE | perm, data, (0, 0));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, SYMLINK | 0o777, target.as_bytes(), (0, 0));
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, CHAR_DEV | perm, b"", (major, minor));
    }

    /// A directory, file or symlink as a file system has it: `mode` is the
    /// whole `st_mode` (type, set-id bits, permissions), `owner` (uid, gid);
    /// `data` is the file's contents or the link's target.
    pub fn node(&mut self, path: &str, mode: u32, owner: (u32, u32), data: &[u8]) {
        self.owner = owner;
        self.entry(path, mode, data, (0, 0));
        self.owner = (0, 0);
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, b"", (0, 0));
        self.buf
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        let nlink = if mode & TYPE_MASK == DIR { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            self.owner.0,
            self.owner.1,
            nlink,
            0, // mtime: fixed, so the archive is reproducible
            u32::try_from(data.len()).expect("cpio member larger than 4 GiB"),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("cpio name too long"),
            0, // check
        ];
        self.next_ino += 1;
        self.buf.extend_from_slice(b"070701");
        for field in fields {
            self.buf
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }
}
