//! Bounded reads of the files securesrv is pointed at: certificates, revocation lists, the
//! configuration, a client's payload file, and the lines of the interactive client and menu.

use std::io::{BufRead, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Reads the regular file at `path`, at most `max` bytes of it. Anything else is refused
/// rather than read: opening a FIFO put in a file's place would block until something writes
/// to it (at start, where not even SIGTERM could end the wait), and a device such as
/// `/dev/zero` never ends. The file is opened without blocking and judged by what was opened,
/// so that it cannot be swapped for a FIFO after it was looked at.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    read_bounded(file, max)
}

/// Reads `from` to its end, refusing it beyond `max` bytes (a FIFO or a device reports no
/// size, so the bound holds as it is read) with [`std::io::ErrorKind::FileTooLarge`].
pub fn read_bounded(from: impl Read, max: u64) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    from.take(max.saturating_add(1)).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {max} bytes, the most it can be"),
        ));
    }
    Ok(data)
}

/// What [`read_line_bounded`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundedLine {
    /// A line, now in the caller's buffer without its line break.
    Line,
    /// A line longer than the bound, read to its line break and dropped as it was read; how
    /// long it was, without the line break.
    TooLong(u64),
    /// The end of the input, with nothing read.
    End,
}

/// Reads one line of `from` into `line` (cleared first), without its line break, keeping at
/// most `max` bytes: a longer line is read on to its line break (or the end of the input) and
/// discarded as it is read, so that memory stays bounded whatever comes in (`/dev/zero`). The
/// last line needs no line break. Only what the line used is taken from `from`: what follows
/// stays in its buffer for the next reader.
pub fn read_line_bounded(
    from: &mut impl BufRead,
    max: usize,
    line: &mut Vec<u8>,
) -> std::io::Result<BoundedLine> {
    line.clear();
    let mut len: u64 = 0;
    let mut read_any = false;
    loop {
        let available = match from.fill_buf() {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let (part, used, ended) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (&available[..at], at + 1, true),
            None if available.is_empty() => (available, 0, true),
            None => (available, available.len(), false),
        };
        read_any |= used > 0;
        len += part.len() as u64;
        if len <= max as u64 {
            line.extend_from_slice(part);
        } else {
            // Dropped at once: nothing of a line too long is kept.
            line.clear();
        }
        from.consume(used);
        if ended {
            return Ok(match () {
                () if !read_any => BoundedLine::End,
                () if len > max as u64 => BoundedLine::TooLong(len),
                () => BoundedLine::Line,
            });
        }
    }
}

/// A temporary directory for a test, only its owner can use whatever the umask: keys are
/// refused in a directory others, or a shared group, can write to, and under umask 002 a
/// plain temporary directory is 0775.
#[cfg(test)]
pub(crate) fn private_tempdir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_within_its_bound_is_read() {
        let dir = private_tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(read_regular(&file, 3).unwrap(), b"abc");
        let err = read_regular(&file, 2).unwrap_err();
        assert!(err.to_string().contains("larger than 2 bytes"), "{err}");
        // A FIFO is refused at once (opening it for reading would wait for a writer).
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = read_regular(&fifo, 10).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read_regular(dir.path(), 10).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read_regular(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read_bounded(std::io::repeat(0), 1 << 20).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge);
    }

    #[test]
    fn a_line_is_kept_within_its_bound_and_a_longer_one_dropped_to_its_end() {
        // A reader buffer smaller than the lines: a line comes in several parts.
        let input: &[u8] = b"ab\n\nabcdef\nabcd\nxy\xff";
        let mut from = std::io::BufReader::with_capacity(3, input);
        let mut line = Vec::new();
        let expected: [(BoundedLine, &[u8]); 7] = [
            (BoundedLine::Line, b"ab"),
            (BoundedLine::Line, b""),
            (BoundedLine::TooLong(6), b""),
            (BoundedLine::Line, b"abcd"),
            (BoundedLine::Line, b"xy\xff"),
            (BoundedLine::End, b""),
            (BoundedLine::End, b""),
        ];
        for (n, (read, text)) in expected.into_iter().enumerate() {
            let got = read_line_bounded(&mut from, 4, &mut line).unwrap();
            assert_eq!((got, line.as_slice()), (read, text), "line {}", n + 1);
        }
        // What follows a line stays for the next reader.
        let mut from = std::io::BufReader::new(&b"1\nrest\n"[..]);
        assert_eq!(
            read_line_bounded(&mut from, 4, &mut line).unwrap(),
            BoundedLine::Line
        );
        let mut rest = String::new();
        from.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "rest\n");
        // A line without end is read through, none of it kept.
        let mut zeros = std::io::BufReader::new(std::io::repeat(0).take(1 << 20));
        let got = read_line_bounded(&mut zeros, 16, &mut line).unwrap();
        assert_eq!(
            (got, line.capacity() <= 32),
            (BoundedLine::TooLong(1 << 20), true)
        );
    }
}
