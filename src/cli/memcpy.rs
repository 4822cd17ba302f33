//! glibc's `memcpy` on AMD x86-64, and the one re-execution at start that tunes it.
//!
//! glibc (2.36 in Debian 12, among others) copies blocks from 2 KiB up to about the size of the
//! L2 cache with `rep movsb`. On AMD Zen cores that instruction is 10 to 30 times slower when
//! the destination lies 1 to 32 bytes past the source, modulo 64, which half of all copies do
//! by chance. rustls copies every record's plaintext to offset 5 of a fresh buffer before
//! encrypting it, and copies decrypted records out again, so a relayed 16 KiB request meets
//! the slow case several times, more or less often from one start to the next depending on
//! where buffers land. On the machine of docs/PERFORMANCE.md a 16 KiB copy took 3.6 µs on
//! average over relative alignments (10.6 µs at worst) and 0.35 µs with the tunable below.
//!
//! The loader reads glibc's tunables once, when a program starts, so a running process cannot
//! change its own `memcpy`. On a glibc x86-64 build running on an AMD CPU, [`reexec_if_useful`]
//! therefore executes the same binary file again, in the same process (same PID, name, open
//! descriptors and arguments), with `GLIBC_TUNABLES` set so that glibc uses its vector loop
//! instead of `rep movsb`. It does so only when `GLIBC_TUNABLES` is absent from the
//! environment: an operator who sets it, even to the empty string, keeps their choice, and that
//! is also how to turn this off. Children (the watchdog's dispatcher and workers) inherit the
//! variable and are not re-executed. If the re-execution fails the program simply goes on.

use std::ffi::OsStr;

/// The environment variable glibc's loader reads its tunables from.
pub const ENV: &str = "GLIBC_TUNABLES";

/// Copies below this size use `rep movsb` (glibc's default is 2 KiB); the maximum the tunable
/// takes in practice, so copies of every size use the vector loop (and, past glibc's
/// non-temporal threshold, non-temporal stores, as before).
pub const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold=4294967295";

/// Whether to set [`TUNABLE`], given the current value of [`ENV`] and the CPU's `vendor_id`.
pub fn wanted(existing: Option<&OsStr>, vendor: Option<&str>) -> bool {
    existing.is_none() && matches!(vendor, Some("AuthenticAMD" | "HygonGenuine"))
}

/// The CPU's `vendor_id` from `/proc/cpuinfo`, if it can be read.
pub fn cpu_vendor() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("vendor_id"))
        .and_then(|rest| rest.split(':').nth(1))
        .map(|v| v.trim().to_owned())
}

/// Executes this program again with [`TUNABLE`] set, when [`wanted`]; returns only if it is
/// not wanted or the execution failed. Call first thing in `main`, before any thread starts.
#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
pub fn reexec_if_useful() {
    use std::os::unix::process::CommandExt;
    if !wanted(std::env::var_os(ENV).as_deref(), cpu_vendor().as_deref()) {
        return;
    }
    let mut args = std::env::args_os();
    let Some(argv0) = args.next() else { return };
    // The file this process runs, by its own name: executing `/proc/self/exe` would name the
    // process `exe` (its `comm`, what `ps`, `top` and `pgrep` show). A file replaced or removed
    // since the start ("... (deleted)") fails to execute, and this process goes on as it is.
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let _failed = std::process::Command::new(exe)
        .arg0(argv0)
        .args(args)
        .env(ENV, TUNABLE)
        .exec();
}

/// Other platforms have no such `memcpy`, or no such tunable.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
pub fn reexec_if_useful() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_on_amd_and_only_when_the_operator_has_not_chosen() {
        let set = OsStr::new("glibc.malloc.check=0");
        let empty = OsStr::new("");
        let cases: &[(Option<&OsStr>, Option<&str>, bool)] = &[
            (None, Some("AuthenticAMD"), true),
            (None, Some("HygonGenuine"), true),
            (None, Some("GenuineIntel"), false),
            (None, None, false),
            (Some(set), Some("AuthenticAMD"), false),
            (Some(empty), Some("AuthenticAMD"), false),
        ];
        for &(existing, vendor, want) in cases {
            assert_eq!(wanted(existing, vendor), want, "{existing:?} {vendor:?}");
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
