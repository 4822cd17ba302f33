//! Bounded reads of the files securesrv is pointed at: certificates, revocation lists, the
//! configuration, a client's payload file.

use std::io::Read;
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
}
