//! Token key files: the dispatcher's master key (`token.key`) and each worker's key derived
//! from it for the worker's identity (`worker-N.token`), made, rotated and read.

use super::{
    CertError, MASTER_TOKEN_KEY, NamedBy, Staged, create_private_dir, file_stem, io_err,
    read_secret_file,
};
use crate::identity::SpiffeId;
use crate::token::{KeyFile, KeyFileError, SecretKey};
use std::fs;
use std::path::{Path, PathBuf};

/// The token key file of worker `id` in `dir`.
pub fn worker_token_path(dir: &Path, id: &SpiffeId) -> PathBuf {
    dir.join(format!("{}.token", file_stem(id)))
}

/// Loads a token key file, refusing a file others can read.
pub fn load_key_file(path: &Path) -> Result<KeyFile, CertError> {
    let data = read_secret_file(path)?;
    let text = std::str::from_utf8(&data).map_err(|_| CertError::KeyFile {
        path: path.to_path_buf(),
        source: KeyFileError::NotText,
    })?;
    KeyFile::parse(text).map_err(|source| CertError::KeyFile {
        path: path.to_path_buf(),
        source,
    })
}

/// [`load_key_file`] for a component that signs or checks tokens with it now: a file whose
/// current key has retired is refused (`certs` commands load such a file to rotate it).
pub fn load_live_key_file(path: &Path) -> Result<KeyFile, CertError> {
    let keys = load_key_file(path)?;
    keys.check_current_live(crate::token::now_ms())
        .map_err(|source| CertError::KeyFile {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(keys)
}

/// Writes worker `id`'s key file, derived from `master`.
pub(super) fn write_worker_token(
    dir: &Path,
    master: &KeyFile,
    id: &SpiffeId,
    force: bool,
) -> Result<PathBuf, CertError> {
    let staged = stage_worker_token(dir, master, id)?;
    let path = staged.path().to_path_buf();
    staged.commit(force)?;
    Ok(path)
}

/// Worker `id`'s key file, derived from `master`, staged (not yet in place).
pub(super) fn stage_worker_token(
    dir: &Path,
    master: &KeyFile,
    id: &SpiffeId,
) -> Result<Staged, CertError> {
    let derived = master.map_keys(|k| k.derive_for(id));
    Staged::write(
        &worker_token_path(dir, id),
        derived.render().as_bytes(),
        0o600,
    )
}

/// The numbers N of the `worker-N<suffix>` files in `dir` (`.token`, `.crt`), ascending.
fn worker_numbers(dir: &Path, suffix: &str) -> Result<Vec<u32>, CertError> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let name = entry.map_err(io_err(dir))?.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("worker-"))
            .and_then(|s| s.strip_suffix(suffix))
            // Only the names we write: not `worker-03.token` or `worker-+3.token`.
            .and_then(|s| s.parse::<u32>().ok().filter(|n| n.to_string() == s))
        {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// The workers' trust domain: `given`, else the one the CA in `dir` names (its certificates
/// carry it), else the default.
fn trust_domain_for(dir: &Path, given: Option<&str>) -> String {
    given
        .map(str::to_string)
        .or_else(|| super::ca_trust_domain_in(dir))
        .unwrap_or_else(|| crate::identity::DEFAULT_TRUST_DOMAIN.to_string())
}

/// `certs rotate-token-key`: a new master key; previous keys stay valid for `keep_ms`. Every
/// `worker-*.token` in `dir` is re-derived for its worker's identity in the trust domain
/// given, else the CA's (the one its workers' certificates carry), else the default. A file
/// not made for that trust domain is refused before anything is written: re-derived for
/// another one, or left as it is, no token would verify. Returns the paths written.
pub fn rotate_token_key(
    dir: &Path,
    trust_domain: Option<&str>,
    keep_ms: u64,
) -> Result<Vec<PathBuf>, CertError> {
    rotate(dir, trust_domain, keep_ms).map_err(|e| e.named_by(NamedBy::CertsCommand))
}

fn rotate(dir: &Path, trust_domain: Option<&str>, keep_ms: u64) -> Result<Vec<PathBuf>, CertError> {
    let master_path = dir.join(MASTER_TOKEN_KEY);
    let master = load_key_file(&master_path)?;
    let td = trust_domain_for(dir, trust_domain);
    let mut workers = Vec::new();
    for n in worker_numbers(dir, ".token")? {
        let path = dir.join(format!("worker-{n}.token"));
        let id = SpiffeId::worker(&td, n)?;
        let current = load_key_file(&path)?.render();
        if *master.map_keys(|k| k.derive_for(&id)).render() != *current {
            return Err(CertError::TokenKeysDiffer {
                path,
                trust_domain: td.clone(),
            });
        }
        workers.push(id);
    }
    let now = crate::token::now_ms();
    let rotated = master
        .rotated(SecretKey::generate()?, now, now.saturating_add(keep_ms))
        .map_err(|source| CertError::KeyFile {
            path: master_path.clone(),
            source,
        })?;
    // Every file is written before any is put in place: a failed write changes nothing. The
    // workers' files go in first, so that a dispatcher restarted in between still mints with
    // a key every worker knows.
    let mut staged = Vec::new();
    for id in &workers {
        staged.push(stage_worker_token(dir, &rotated, id)?);
    }
    staged.push(Staged::write(
        &master_path,
        rotated.render().as_bytes(),
        0o600,
    )?);
    commit_all(staged)
}

/// `certs token-keys`: a new master token key and the keys of the workers numbered in
/// `workers` derived from it, for certificates made by another tool (`certs init` makes them too), in the
/// trust domain given, else the CA's, else the default. The key files of other workers
/// already in `dir` are derived afresh too, so that none is left on the old key. Refuses to
/// replace an existing `token.key` unless `force`.
pub fn token_keys(
    dir: &Path,
    trust_domain: Option<&str>,
    workers: &[u32],
    force: bool,
) -> Result<Vec<PathBuf>, CertError> {
    super::check_workers(workers)?;
    let td = trust_domain_for(dir, trust_domain);
    let mut numbers = workers.to_vec();
    // The workers whose certificate is here (made by another tool) need one as much as
    // those that had one: the command is for those certificates.
    if dir.exists() {
        numbers.extend(worker_numbers(dir, ".token")?);
        numbers.extend(worker_numbers(dir, ".crt")?);
    }
    numbers.sort_unstable();
    numbers.dedup();
    let ids = numbers
        .into_iter()
        .map(|n| SpiffeId::worker(&td, n))
        .collect::<Result<Vec<_>, _>>()?;
    let master_path = dir.join(MASTER_TOKEN_KEY);
    if master_path.exists() && !force {
        return Err(CertError::Exists(
            master_path,
            " (a new token key makes every worker's key invalid; to change keys while serving, \
             use rotate-token-key)",
        ));
    }
    create_private_dir(dir)?;
    let master = KeyFile::single(1, SecretKey::generate()?);
    // All new keys: every component restarts to use them, so the order they go in does not
    // matter (a rotation's does).
    let mut staged = vec![Staged::write(
        &master_path,
        master.render().as_bytes(),
        0o600,
    )?];
    for id in &ids {
        staged.push(stage_worker_token(dir, &master, id)?);
    }
    commit_all(staged)
}

/// Largest file [`copy_aside`] copies: any key or certificate it replaces.
const MAX_ASIDE: u64 = 16 << 20;

/// Copies the file `path` (a key or a certificate) to a new file beside it, with the same mode,
/// under a name no one can guess, and returns that name. The copy is made only as a new file: it was made to a name of
/// the process ID, removed and then created with a plain copy, which followed a symbolic link
/// put at that name in between, so that anyone who could write to the directory could have
/// the key written over a file of their choice (root's, say) or into one they read. Found by
/// a file-handling review.
fn copy_aside(path: &Path) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Only a regular file of a bounded size is copied, opened without blocking: a FIFO in a
    // key's place hung the command for ever in `open`, and a link to `/dev/zero` was copied
    // until the disk was full (found by an input-hardening review).
    let from = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let meta = from.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(
            "not a regular file: remove it, then run the command again",
        ));
    }
    let data =
        zeroize::Zeroizing::new(crate::files::read_bounded(from, MAX_ASIDE).map_err(|e| {
            match e.kind() {
                std::io::ErrorKind::FileTooLarge => std::io::Error::other(format!(
                    "too large to keep a copy of until the new files are in place (over {} MiB; \
                 no key or certificate is): remove it, then run the command again",
                    MAX_ASIDE >> 20
                )),
                _ => e,
            }
        })?);
    let mut random = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
        .map_err(|_| std::io::Error::other("random generator failed"))?;
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.old", hex::encode(random)));
    let aside = path.with_file_name(name);
    // `create_new` (O_EXCL) refuses any name that exists, a symbolic link included.
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)?;
    // Made 0600, then given the original's mode once it holds the same (a certificate put
    // back after a failed commit stays readable, 0644).
    let copied = to
        .write_all(&data)
        .and_then(|()| to.set_permissions(meta.permissions()))
        .and_then(|()| to.sync_all());
    if let Err(e) = copied {
        let _ = fs::remove_file(&aside);
        return Err(e);
    }
    Ok(aside)
}

/// Puts staged files in place, in order, all or none; returns their paths. Each file about
/// to be replaced is copied aside first: if a later file cannot be put in place (a rename
/// refused: an immutable file, a read-only mount), the ones already replaced get their old
/// contents back and new ones are removed, so that no worker is left on keys the master
/// does not hold.
pub(super) fn commit_all(staged: Vec<Staged>) -> Result<Vec<PathBuf>, CertError> {
    super::interrupt::check()?;
    let paths: Vec<PathBuf> = staged.iter().map(|f| f.path().to_path_buf()).collect();
    let mut saved: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
    let forget = |saved: &[(PathBuf, Option<PathBuf>)]| {
        for aside in saved.iter().filter_map(|(_, a)| a.as_ref()) {
            let _ = fs::remove_file(aside);
        }
    };
    for path in &paths {
        let aside = if path.exists() {
            match copy_aside(path) {
                Ok(aside) => Some(aside),
                Err(e) => {
                    forget(&saved);
                    return Err(io_err(path)(e));
                }
            }
        } else {
            None
        };
        saved.push((path.clone(), aside));
    }
    for (n, file) in staged.into_iter().enumerate() {
        if let Err(e) = file.commit(true) {
            // This one and those before it go back as they were.
            for (path, aside) in &saved[..=n] {
                match aside {
                    // Refused too (the file that failed, if its rename was): then it was
                    // never replaced, and the copy goes.
                    Some(aside) => {
                        if fs::rename(aside, path).is_err() {
                            let _ = fs::remove_file(aside);
                        }
                    }
                    None => {
                        let _ = fs::remove_file(path);
                    }
                }
            }
            forget(&saved[n + 1..]);
            return Err(e);
        }
    }
    forget(&saved);
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The copy of a key about to be replaced is a new 0600 file under a name no one can
    /// guess beforehand (it was the process ID's, written through whatever was put there); a
    /// certificate's keeps its 0644.
    #[test]
    fn a_key_is_copied_aside_only_into_a_new_file_of_its_own() {
        let dir = crate::files::private_tempdir().unwrap();
        let key = dir.path().join("token.key");
        fs::write(&key, b"secret").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let (a, b) = (copy_aside(&key).unwrap(), copy_aside(&key).unwrap());
        assert_ne!(a, b, "the same name twice");
        for aside in [&a, &b] {
            let name = aside.file_name().unwrap().to_str().unwrap();
            assert!(
                name.starts_with(".token.key.") && name.ends_with(".old"),
                "{name}"
            );
            assert!(!name.contains(&std::process::id().to_string()), "{name}");
            assert_eq!(fs::read(aside).unwrap(), b"secret");
            let meta = fs::symlink_metadata(aside).unwrap();
            assert!(meta.file_type().is_file());
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
        let crt = dir.path().join("a.crt");
        fs::write(&crt, b"public").unwrap();
        fs::set_permissions(&crt, fs::Permissions::from_mode(0o644)).unwrap();
        let aside = copy_aside(&crt).unwrap();
        assert_eq!(
            fs::metadata(aside).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    /// A FIFO in a file's place hung `--force` for ever, and a link to `/dev/zero` was copied
    /// aside until the disk was full: no file but a regular one is copied, nor one larger than
    /// any key or certificate. (Run on a thread and waited for with a bound: without the fix
    /// the FIFO's `open` never returns. A link to `/dev/null` stands for `/dev/zero`: without
    /// the fix it is copied, empty, where `/dev/zero` would fill the disk.)
    #[test]
    fn only_a_regular_file_of_a_bounded_size_is_copied_aside() {
        let dir = crate::files::private_tempdir().unwrap();
        let fifo = dir.path().join("worker-2.token");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let null = dir.path().join("worker-3.token");
        std::os::unix::fs::symlink("/dev/null", &null).unwrap();
        let big = dir.path().join("worker-4.token");
        fs::File::create(&big)
            .unwrap()
            .set_len(MAX_ASIDE + 1)
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = [fifo, null, big];
        let tried = paths.clone();
        std::thread::spawn(move || {
            let _ = tx.send(tried.map(|p| copy_aside(&p).map_err(|e| e.to_string())));
        });
        let results = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("copy_aside returned (a FIFO's open used to block for ever)");
        for (path, result) in paths.iter().zip(&results[..2]) {
            let err = result.as_ref().expect_err("not copied");
            assert!(
                err.contains("not a regular file"),
                "{}: {err}",
                path.display()
            );
        }
        let err = results[2].as_ref().expect_err("not copied");
        assert!(err.contains("too large to keep a copy of"), "{err}");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 3, "nothing copied aside");
    }
}
