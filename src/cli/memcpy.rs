//! glibc's `memcpy` on AMD x86-64, and the one re-execution at start that tunes it.
//!
//! glibc (2.36 in Debian 12, among others) copies blocks from 2 KiB up to about the size of the
//! L2 cache with `rep movsb`. On AMD Zen cores that instruction is up to 30 times slower when
//! the destination lies 1 to 32 bytes past the source, modulo 64, which half of all copies do
//! by chance. rustls copies every record's plaintext to offset 5 of a fresh buffer before
//! encrypting it, and copies decrypted records out again, so a relayed 16 KiB request meets
//! the slow case several times, more or less often from one start to the next depending on
//! where buffers land. On the machine of docs/PERFORMANCE.md a 16 KiB copy took 3.6 µs on
//! average over relative alignments (10.6 µs at worst) and 0.35 µs with the tunable below.
//!
//! The loader reads glibc's tunables once, when a program starts, so a running process cannot
//! change its own `memcpy`. On a glibc x86-64 build running on an AMD CPU, [`reexec_if_useful`]
//! therefore executes its own file again, in the same process (same PID, open descriptors and
//! arguments; the name is the file's, through a symbolic link the target's), with
//! `GLIBC_TUNABLES` set so that glibc uses its vector loop instead of `rep movsb`, and
//! [`MARKER`] set so that it never happens twice. It does not when `GLIBC_TUNABLES` is in the
//! environment already (an operator who sets it, even to the empty string, keeps their choice,
//! and that is also how to turn this off), in a set-user-ID or file-capability start (the
//! loader ignores tunables there), or when the dynamic loader was run as the program. Children
//! (the watchdog's dispatcher and workers) inherit both variables and are not re-executed. If
//! the execution fails, one line on stderr says so and the program goes on unchanged.

use std::ffi::OsStr;

/// The environment variable glibc's loader reads its tunables from.
pub const ENV: &str = "GLIBC_TUNABLES";

/// Copies from this size up would use `rep movsb` (glibc's default is 2 KiB): a threshold no
/// copy reaches, so every size uses the vector loop (and, past glibc's non-temporal
/// threshold, non-temporal stores, as before).
pub const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold=4294967295";

/// Set, with [`TUNABLE`], in the environment of the re-executed image: it never executes
/// itself again, even if something between the two images dropped `GLIBC_TUNABLES`.
pub const MARKER: &str = "SECURESRV_MEMCPY_TUNED";

/// What the kernel said about this start, from the auxiliary vector (`/proc/self/auxv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// `AT_SECURE`: set-user-ID, set-group-ID or file capabilities. The loader then ignores
    /// tunables (glibc 2.39 and later also removes `GLIBC_TUNABLES`, which without this check
    /// would have the program execute itself forever).
    pub secure: bool,
    /// `AT_BASE` is not zero: the kernel started this program through its dynamic loader. It
    /// is zero when the loader itself was run as the program (`ld-linux-x86-64.so.2 securesrv
    /// ...`); executing "this file" would then run the loader with our arguments.
    pub through_loader: bool,
}

/// Reads the auxiliary vector (native-endian pairs of type and value, up to `AT_NULL`).
/// `None` unless it names `AT_SECURE`.
pub fn parse_auxv(bytes: &[u8]) -> Option<Start> {
    const AT_NULL: u64 = 0;
    const AT_BASE: u64 = 7;
    const AT_SECURE: u64 = 23;
    let word = |b: &[u8]| b.try_into().ok().map(u64::from_ne_bytes);
    let mut secure = None;
    let mut through_loader = false;
    for pair in bytes.chunks_exact(16) {
        let (key, value) = (word(&pair[..8])?, word(&pair[8..])?);
        match key {
            AT_NULL => break,
            AT_BASE => through_loader = value != 0,
            AT_SECURE => secure = Some(value != 0),
            _ => {}
        }
    }
    secure.map(|secure| Start {
        secure,
        through_loader,
    })
}

/// Whether to execute again with [`TUNABLE`]: given the current `GLIBC_TUNABLES`, whether
/// [`MARKER`] is set, how this process started and (asked last, only if all else agrees) the
/// CPU's `vendor_id`.
pub fn wanted(
    existing: Option<&OsStr>,
    marked: bool,
    start: Start,
    vendor: impl FnOnce() -> Option<String>,
) -> bool {
    existing.is_none()
        && !marked
        && !start.secure
        && start.through_loader
        && matches!(vendor().as_deref(), Some("AuthenticAMD" | "HygonGenuine"))
}

/// The CPU's `vendor_id` from `/proc/cpuinfo` (read only as far as that line), if it can be
/// read.
pub fn cpu_vendor() -> Option<String> {
    use std::io::BufRead;
    let info = std::io::BufReader::new(std::fs::File::open("/proc/cpuinfo").ok()?);
    info.lines().map_while(Result::ok).find_map(|l| {
        l.strip_prefix("vendor_id")
            .and_then(|rest| rest.split(':').nth(1))
            .map(|v| v.trim().to_owned())
    })
}

/// Executes this program again with [`TUNABLE`] set, when [`wanted`]; returns only if it is
/// not wanted or the execution failed, with nothing about the process changed. Call first
/// thing in `main`, before any thread starts.
#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
pub fn reexec_if_useful() {
    use std::ffi::CString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let Some(start) = std::fs::read("/proc/self/auxv")
        .ok()
        .and_then(|b| parse_auxv(&b))
    else {
        return;
    };
    let existing = std::env::var_os(ENV);
    let marked = std::env::var_os(MARKER).is_some();
    if !wanted(existing.as_deref(), marked, start, cpu_vendor) {
        return;
    }
    // The file this process runs, by its own name: executing `/proc/self/exe` would name the
    // process `exe` (its `comm`, what `ps`, `top` and `pgrep` show). A file replaced or removed
    // since the start ("... (deleted)") fails to execute, and this process goes on as it is.
    let Some(path) = std::env::current_exe()
        .ok()
        .and_then(|p| CString::new(p.into_os_string().into_vec()).ok())
    else {
        return;
    };
    let cstr = |b: &[u8]| CString::new(b).ok();
    let Some(args) = std::env::args_os()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Option<Vec<_>>>()
    else {
        return;
    };
    let Some(mut env) = std::env::vars_os()
        .map(|(k, v)| cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<Option<Vec<_>>>()
    else {
        return;
    };
    env.extend(cstr(format!("{ENV}={TUNABLE}").as_bytes()));
    env.extend(cstr(format!("{MARKER}=1").as_bytes()));
    // `execve` itself, not `std::process::Command::exec`: that one first resets the signal
    // mask and SIGPIPE's disposition, and a failed execution would leave SIGPIPE able to kill
    // the process on a write to a closed socket.
    let Err(e) = nix::unistd::execve(&path, &args, &env);
    securesrv::errln!(
        "securesrv: could not start again with {ENV} (glibc memcpy tuning), going on without it: {e}"
    );
}

/// Other platforms have no such `memcpy`, or no such tunable.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
pub fn reexec_if_useful() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_on_amd_through_the_loader_unprivileged_and_when_nobody_chose() {
        let set = OsStr::new("glibc.malloc.check=0");
        let empty = OsStr::new("");
        let normal = Start {
            secure: false,
            through_loader: true,
        };
        let secure = Start {
            secure: true,
            ..normal
        };
        let loader_run = Start {
            through_loader: false,
            ..normal
        };
        let amd = Some("AuthenticAMD");
        // GLIBC_TUNABLES, marker set, vendor, start, wanted.
        type Case<'a> = (Option<&'a OsStr>, bool, Option<&'a str>, Start, bool);
        let cases: &[Case] = &[
            (None, false, amd, normal, true),
            (None, false, Some("HygonGenuine"), normal, true),
            (None, false, Some("GenuineIntel"), normal, false),
            (None, false, None, normal, false),
            (Some(set), false, amd, normal, false),
            (Some(empty), false, amd, normal, false),
            (None, true, amd, normal, false),
            (None, false, amd, secure, false),
            (None, false, amd, loader_run, false),
        ];
        // The vendor is not looked up when the rest already says no.
        assert!(!wanted(Some(empty), false, normal, || unreachable!()));
        assert!(!wanted(None, false, secure, || unreachable!()));
        for &(existing, marked, vendor, start, want) in cases {
            assert_eq!(
                wanted(existing, marked, start, || vendor.map(str::to_owned)),
                want,
                "{existing:?} {marked} {vendor:?} {start:?}"
            );
        }
    }

    fn auxv(pairs: &[(u64, u64)]) -> Vec<u8> {
        pairs
            .iter()
            .flat_map(|&(k, v)| [k.to_ne_bytes(), v.to_ne_bytes()].concat())
            .collect()
    }

    #[test]
    fn the_auxiliary_vector_is_read_up_to_its_end() {
        let start = |secure, through_loader| {
            Some(Start {
                secure,
                through_loader,
            })
        };
        // AT_PAGESZ, AT_BASE, AT_SECURE, AT_NULL.
        assert_eq!(
            parse_auxv(&auxv(&[(6, 4096), (7, 0x7f00), (23, 0), (0, 0)])),
            start(false, true)
        );
        assert_eq!(
            parse_auxv(&auxv(&[(7, 0x7f00), (23, 1), (0, 0)])),
            start(true, true)
        );
        assert_eq!(
            parse_auxv(&auxv(&[(7, 0), (23, 0), (0, 0)])),
            start(false, false)
        );
        // Without AT_SECURE nothing is known; entries after AT_NULL do not count.
        assert_eq!(parse_auxv(&auxv(&[(7, 0x7f00), (0, 0), (23, 0)])), None);
        assert_eq!(parse_auxv(&[]), None);
        // A torn last pair is ignored.
        let mut torn = auxv(&[(23, 0), (7, 1)]);
        torn.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_auxv(&torn), start(false, true));
        // This process: started through the loader, not privileged.
        if let Ok(mine) = std::fs::read("/proc/self/auxv") {
            assert_eq!(parse_auxv(&mine), start(false, true));
        }
    }

    #[test]
    fn the_vendor_is_read_from_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        if info.contains("vendor_id") {
            let v = cpu_vendor().expect("vendor_id present but not parsed");
            assert!(!v.is_empty() && !v.contains(':'), "{v:?}");
            assert!(info.contains(&v));
        }
    }
}
