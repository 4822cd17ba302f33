//! What a worker can do: the built-in ops (`echo`, `sha256`, `sleep`), operator-declared jobs,
//! and handlers registered by a program that embeds the worker.
//!
//! A handler receives the payload and the request's context and returns the answer bytes or an
//! [`OpError`]; it never sees tokens, sockets or frames.

use super::jobs::JobGroups;
use crate::config::Config;
use crate::message::Bytes;
use crate::message::ErrorCode;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The boxed future a handler returns.
pub type OpFuture = Pin<Box<dyn Future<Output = Result<Bytes, OpError>> + Send>>;

/// What a handler knows about the request it runs.
#[derive(Debug, Clone)]
pub struct OpRequest {
    /// The client's payload.
    pub payload: Bytes,
    /// The verified client identity (from the dispatcher's token).
    pub client: String,
    /// Time left before the dispatcher gives up.
    pub time_left: Duration,
}

/// How an op failed. The message is sent to the client: keep internal detail out of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// The payload is not acceptable to this op.
    #[error("{0}")]
    BadInput(String),
    /// The op ran and failed (a job's non-zero exit, say).
    #[error("{0}")]
    Failed(String),
    /// The op ran past its time limit and was stopped.
    #[error("{0}")]
    Timeout(String),
    /// The answer would be larger than allowed.
    #[error("{0}")]
    TooLarge(String),
}

impl OpError {
    /// The wire code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            OpError::BadInput(_) => ErrorCode::BadRequest,
            OpError::Failed(_) => ErrorCode::OpFailed,
            OpError::Timeout(_) => ErrorCode::Timeout,
            OpError::TooLarge(_) => ErrorCode::TooLarge,
        }
    }
}

/// An op implementation.
pub trait Handler: Send + Sync + 'static {
    /// Runs the op.
    fn call(&self, req: OpRequest) -> OpFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(OpRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, OpError>> + Send + 'static,
{
    fn call(&self, req: OpRequest) -> OpFuture {
        Box::pin(self(req))
    }
}

/// The ops one worker serves, by name.
#[derive(Clone, Default)]
pub struct OpRegistry {
    handlers: HashMap<String, Arc<dyn Handler>>,
    /// The process groups of the jobs running now, for the worker to kill on its way out.
    jobs: JobGroups,
}

impl std::fmt::Debug for OpRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("OpRegistry").field("ops", &names).finish()
    }
}

impl OpRegistry {
    /// The built-ins plus every job of `cfg`.
    pub fn from_config(cfg: &Config) -> Self {
        let mut r = OpRegistry::default();
        r.register("echo", |req: OpRequest| async move { Ok(req.payload) });
        r.register("sha256", |req: OpRequest| async move {
            Ok(hex::encode(crate::token::payload_digest(&req.payload)).into())
        });
        let max_sleep = cfg.limits.max_sleep_ms;
        r.register("sleep", move |req: OpRequest| sleep(req, max_sleep));
        for job in &cfg.jobs {
            // Its cap settled for the limits this worker runs with.
            let job = Arc::new(crate::config::JobConfig {
                max_output_bytes: Some(job.output_cap(&cfg.limits)),
                ..job.clone()
            });
            let groups = r.jobs.clone();
            r.register(&job.name.clone(), move |req: OpRequest| {
                super::jobs::run(job.clone(), req.payload, groups.clone())
            });
        }
        r
    }

    /// Adds (or replaces) the handler for `op`. An embedding program uses this for its own
    /// ops; the dispatcher must also know them (`[[custom_ops]]` in the config).
    pub fn register(&mut self, op: &str, handler: impl Handler) {
        self.handlers.insert(op.to_string(), Arc::new(handler));
    }

    /// The process groups of the jobs started through this registry (and its clones, which
    /// share them): [`JobGroups::kill_all`] kills every job still running.
    pub fn job_groups(&self) -> &JobGroups {
        &self.jobs
    }

    /// The handler for `op`.
    pub fn get(&self, op: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(op).cloned()
    }

    /// What in `cfg` this worker cannot run, one line each: a job whose program is not an
    /// executable file here, a `[[custom_ops]]` entry with no handler registered. Each
    /// would show only at its first call (`op_failed`, `unknown_op`); said at start, the
    /// operator hears of it with the rest of the configuration.
    pub fn unusable(&self, cfg: &Config) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let mut found = Vec::new();
        for job in &cfg.jobs {
            let why = match std::fs::metadata(&job.program) {
                Err(e) => Some(e.to_string()),
                Ok(m) if !m.is_file() => Some("not a regular file".to_string()),
                Ok(m) if m.permissions().mode() & 0o111 == 0 => Some("not executable".to_string()),
                Ok(_) => None,
            };
            if let Some(why) = why {
                found.push(format!(
                    "job {}: program {} cannot be run ({why}); its calls will fail with op_failed",
                    crate::identity::printable(&job.name),
                    crate::identity::printable(&job.program.display().to_string())
                ));
            }
        }
        for op in &cfg.custom_ops {
            if self.get(&op.name).is_none() {
                found.push(format!(
                    "custom op {} has no handler in this worker (custom ops are registered by \
                     a program built on the securesrv library); its calls will get unknown_op",
                    crate::identity::printable(&op.name)
                ));
            }
        }
        found
    }
}

/// Most digits a `sleep` payload may have, leading zeros included (docs/PROTOCOL.md §3.1).
const SLEEP_MAX_DIGITS: usize = 12;

/// `sleep`: payload = milliseconds as ASCII digits, capped at `limits.max_sleep_ms`.
async fn sleep(req: OpRequest, max_ms: u64) -> Result<Bytes, OpError> {
    let text = std::str::from_utf8(&req.payload)
        .ok()
        // ASCII whitespace only, as documented (str::trim would take any Unicode space).
        .map(|t| t.trim_matches(|c: char| c.is_ascii_whitespace()))
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| OpError::BadInput("sleep wants a number of milliseconds".into()))?;
    // A number too long to be allowed is still a number: say it is too large, and the limit.
    let digits = text.trim_start_matches('0');
    let ms = match text.parse::<u64>() {
        Ok(ms) if text.len() <= SLEEP_MAX_DIGITS || ms > max_ms => ms,
        Ok(_) => {
            return Err(OpError::BadInput(format!(
                "sleep wants at most {SLEEP_MAX_DIGITS} digits of milliseconds"
            )));
        }
        // Over u64::MAX (any limit is far below): named by its length when long.
        Err(_) if digits.len() <= 24 => {
            return Err(too_long_a_sleep(digits, max_ms));
        }
        Err(_) => {
            let shown = format!("a {}-digit number of", digits.len());
            return Err(too_long_a_sleep(&shown, max_ms));
        }
    };
    if ms > max_ms {
        return Err(too_long_a_sleep(&ms.to_string(), max_ms));
    }
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(format!("slept {ms} ms").into())
}

/// The answer to a `sleep` over the limit (`ms`: the number asked for, as shown).
fn too_long_a_sleep(ms: &str, max_ms: u64) -> OpError {
    OpError::BadInput(format!("sleep of {ms} ms exceeds the limit of {max_ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(payload: &[u8]) -> OpRequest {
        OpRequest {
            payload: Bytes::copy_from_slice(payload),
            client: "spiffe://securesrv/client/default".into(),
            time_left: Duration::from_secs(5),
        }
    }

    /// A job whose program cannot run here and a custom op nothing registered are said at
    /// start; they used to show only at their first call. Found by an operator review.
    #[test]
    fn what_cannot_run_here_is_listed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = crate::files::private_tempdir().unwrap();
        let text = tmp.path().join("notes.txt");
        std::fs::write(&text, b"not a program").unwrap();
        std::fs::set_permissions(&text, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cfg = Config::parse(&format!(
            "[[jobs]]\nname = \"ghost\"\nprogram = \"/nonexistent/prog\"\n\
             [[jobs]]\nname = \"text\"\nprogram = {:?}\n\
             [[jobs]]\nname = \"dir\"\nprogram = {:?}\n\
             [[jobs]]\nname = \"shell\"\nprogram = \"/bin/sh\"\n\
             [[custom_ops]]\nname = \"resize\"\n\
             [[custom_ops]]\nname = \"mine\"\n",
            text,
            tmp.path()
        ))
        .unwrap();
        let mut ops = OpRegistry::from_config(&cfg);
        ops.register("mine", |req: OpRequest| async move { Ok(req.payload) });
        let found = ops.unusable(&cfg);
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(found[0].starts_with("job ghost: program /nonexistent/prog cannot be run ("));
        assert!(found[1].starts_with("job text: program "), "{}", found[1]);
        assert!(found[1].contains("notes.txt cannot be run (not executable)"));
        assert!(found[2].contains("(not a regular file)"), "{}", found[2]);
        assert!(
            found[3].starts_with("custom op resize has no handler"),
            "{}",
            found[3]
        );
    }

    /// The cap a job without one gets is the one that fits this worker's frames, also for a
    /// configuration that was never validated (a program embedding the worker): it was
    /// usize::MAX, and the output grew without bound. Found by a review.
    #[tokio::test]
    async fn a_job_without_a_cap_is_held_to_what_a_frame_of_this_worker_holds() {
        let cfg: Config = toml::from_str(
            "[limits]\nmax_frame_bytes = 4096\n\
             [[jobs]]\nname = \"big\"\nprogram = \"/usr/bin/head\"\nargs = [\"-c\", \"10000\", \"/dev/zero\"]\n",
        )
        .unwrap();
        let r = OpRegistry::from_config(&cfg);
        let cap = 4096 - crate::frame::REPLY_OVERHEAD;
        match r.get("big").unwrap().call(req(b"")).await {
            Err(OpError::TooLarge(m)) => {
                assert!(m.contains(&format!("wrote more than {cap} bytes")), "{m}")
            }
            other => panic!("expected too_large, got {:?}", other.map(|out| out.len())),
        }
    }

    #[tokio::test]
    async fn builtins() {
        let r = OpRegistry::from_config(&Config::default());
        let call = |op: &str, p: &[u8]| r.get(op).unwrap().call(req(p));
        assert_eq!(call("echo", b"abc").await.unwrap(), b"abc".as_slice());
        assert_eq!(
            call("sha256", b"abc").await.unwrap(),
            b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".as_slice()
        );
        assert_eq!(call("sleep", b"5").await.unwrap(), b"slept 5 ms".as_slice());
        assert_eq!(
            call("sleep", b" \t\r\n\x0c005 \n").await.unwrap(),
            b"slept 5 ms".as_slice()
        );
        // ASCII whitespace only, as PROTOCOL.md says: not U+00A0, U+3000 or U+0085.
        for bad in [
            &b"x"[..],
            b"",
            b"-1",
            b"99999999999999",
            "\u{a0}5".as_bytes(),
            "\u{3000}5".as_bytes(),
            "5\u{85}".as_bytes(),
            b"\x0b5",
        ] {
            assert!(
                matches!(call("sleep", bad).await, Err(OpError::BadInput(_))),
                "{bad:?}"
            );
        }
        // Too large, however many digits: the answer says so and names the limit (it said
        // only "wants a number" past 12 digits, or past u64::MAX).
        for (big, says) in [
            (
                &b"30001"[..],
                "sleep of 30001 ms exceeds the limit of 30000 ms",
            ),
            (b"9999999999999", "sleep of 9999999999999 ms exceeds"),
            (
                b"0099999999999999999999",
                "sleep of 99999999999999999999 ms exceeds the limit of 30000 ms",
            ),
        ] {
            match call("sleep", big).await {
                Err(OpError::BadInput(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("{big:?}: {other:?}"),
            }
        }
        let huge = vec![b'7'; 100_000];
        match call("sleep", &huge).await {
            Err(OpError::BadInput(m)) => assert_eq!(
                m,
                "sleep of a 100000-digit number of ms exceeds the limit of 30000 ms"
            ),
            other => panic!("{other:?}"),
        }
        // Small, but more digits than PROTOCOL.md allows: refused for its length.
        match call("sleep", b"0000000000005").await {
            Err(OpError::BadInput(m)) => assert!(m.contains("at most 12 digits"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(r.get("nosuch").is_none());
    }

    #[tokio::test]
    async fn embedders_register_their_own_ops() {
        let mut r = OpRegistry::default();
        r.register("upper", |req: OpRequest| async move {
            Ok(req.payload.to_ascii_uppercase().into())
        });
        assert_eq!(
            r.get("upper").unwrap().call(req(b"hi")).await.unwrap(),
            b"HI".as_slice()
        );
    }
}
