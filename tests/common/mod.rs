//! Shared test fixtures: a PKI made by rcgen at test time in a temporary directory, in-process
//! clusters on `127.0.0.1:0`, and real `securesrv` processes whose output can be waited on.
//! Every wait is bounded; every process is killed by PID when its handle drops.
#![allow(dead_code)]

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use securesrv::certs::{self, InitOptions};
use securesrv::client::{Client, ClientConfig};
use securesrv::config::{Config, WorkerEntry};
use securesrv::dispatcher::{self, Dispatcher};
use securesrv::identity::{Role, SpiffeId};
use securesrv::tls::TlsMaterial;
use securesrv::worker::{self, Worker, ops::OpRegistry};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Upper bound on any wait in the tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Certificates for one test, deleted with it.
pub struct Pki {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

/// A temporary directory only its owner can use, whatever the umask: keys are refused in a
/// directory others, or a shared group, can write to, and under umask 002 a plain temporary
/// directory is 0775.
pub fn tempdir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

/// `certs init` for `workers` workers into a fresh temporary directory.
pub fn pki(workers: u32) -> Pki {
    let tmp = tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    certs::init(
        &dir,
        &InitOptions {
            trust_domain: "securesrv".into(),
            workers: certs::numbered_workers(workers),
            days: 2,
            hosts: vec![],
            force: false,
        },
    )
    .expect("certs init");
    Pki { tmp, dir }
}

impl Pki {
    /// Loads the TLS material of `stem` (`client`, `dispatcher`, `worker-1`, ...).
    pub fn material(&self, stem: &str) -> TlsMaterial {
        TlsMaterial::load(
            &self.dir.join("ca.crt"),
            &self.dir.join(format!("{stem}.crt")),
            &self.dir.join(format!("{stem}.key")),
        )
        .expect("load material")
    }

    /// Connects to `addr` as the watchdog (expecting `peer`), sends one heartbeat and returns
    /// the connection and the answer, which must be a pong echoing the nonce.
    pub async fn watchdog_ping(
        &self,
        peer: &SpiffeId,
        addr: SocketAddr,
    ) -> (
        securesrv::connection::Connection<securesrv::tls::ClientStream>,
        securesrv::message::Pong,
    ) {
        use securesrv::connection::{Connection, IoLimits};
        use securesrv::message::{Message, Ping};
        let (stream, _) = self
            .material("watchdog")
            .connector(peer, WAIT)
            .expect("connector")
            .connect(addr)
            .await
            .expect("connect as the watchdog");
        let mut conn = Connection::new(stream, IoLimits::default());
        let nonce = vec![7; 16];
        conn.send(&Message::Ping(Ping {
            nonce: nonce.clone(),
        }))
        .await
        .expect("send ping");
        match conn.read_message().await {
            Ok(Some(Message::Pong(p))) => {
                assert_eq!(p.nonce, nonce, "pong echoes the nonce");
                (conn, p)
            }
            other => panic!("expected a pong, got {other:?}"),
        }
    }

    /// Issues an extra client identity `client-<name>`.
    pub fn add_client(&self, name: &str) {
        certs::issue(
            &self.dir,
            &certs::IssueOptions {
                role: Role::Client,
                name: name.into(),
                trust_domain: None,
                days: 2,
                hosts: vec![],
                force: false,
            },
        )
        .expect("issue client");
    }
}

/// Ports handed out by this test process, so that two tests never get the same one.
static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A port below the kernel's ephemeral range (so no outgoing connection of a parallel test
/// can take it meanwhile) that was free a moment ago and not given to another test.
pub fn free_port() -> u16 {
    free_port_block(0)
}

/// A base port P such that P..=P+n were all free a moment ago (dispatcher at P, worker N at
/// P+N, the default layout), chosen outside the ephemeral range.
pub fn free_port_block(n: u16) -> u16 {
    let mut handed = HANDED_OUT.lock().unwrap();
    // Spread processes apart: the pid and a counter pick the starting point.
    let mut candidate = 10_000 + ((std::process::id() as u16).wrapping_mul(97) % 20_000);
    for _ in 0..2_000 {
        candidate = 10_000 + (candidate - 10_000 + 7 + n) % 22_000;
        let range: Vec<u16> = (candidate..=candidate + n).collect();
        if range.iter().any(|p| handed.contains(p)) {
            continue;
        }
        let all_free = range
            .iter()
            .all(|p| StdListener::bind(("127.0.0.1", *p)).is_ok());
        if all_free {
            handed.extend(range);
            return candidate;
        }
    }
    panic!("no free block of {} ports", n + 1);
}

/// A dispatcher and workers running in this process on ephemeral ports.
pub struct Cluster {
    pub cfg: Arc<Config>,
    pub dispatcher: Arc<Dispatcher>,
    pub addr: SocketAddr,
    pub worker_addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    links: CancellationToken,
    worker_stops: Vec<CancellationToken>,
    tracker: TaskTracker,
}

/// Starts `workers` workers and a dispatcher with `tweak` applied to the configuration, and
/// waits until the dispatcher can use every worker.
pub async fn start_cluster(pki: &Pki, workers: u32, tweak: impl FnOnce(&mut Config)) -> Cluster {
    start_cluster_staged(pki, workers, tweak, |_| {}).await
}

/// [`start_cluster`], calling `before_load(Some(id))` before worker `id` loads its keys and
/// `before_load(None)` before the dispatcher does (to change the files between them).
pub async fn start_cluster_staged(
    pki: &Pki,
    workers: u32,
    tweak: impl FnOnce(&mut Config),
    before_load: impl FnMut(Option<u32>),
) -> Cluster {
    start_cluster_with(pki, workers, tweak, |_, _| {}, before_load).await
}

/// [`start_cluster`], with worker `id` running on the configuration `worker_tweak(id, ..)`
/// makes of the dispatcher's (as workers with configuration files of their own).
pub async fn start_cluster_per_worker(
    pki: &Pki,
    workers: u32,
    tweak: impl FnOnce(&mut Config),
    worker_tweak: impl FnMut(u32, &mut Config),
) -> Cluster {
    start_cluster_with(pki, workers, tweak, worker_tweak, |_| {}).await
}

async fn start_cluster_with(
    pki: &Pki,
    workers: u32,
    tweak: impl FnOnce(&mut Config),
    mut worker_tweak: impl FnMut(u32, &mut Config),
    mut before_load: impl FnMut(Option<u32>),
) -> Cluster {
    let mut cfg = Config {
        certs_dir: pki.dir.clone(),
        ..Config::default()
    };
    let mut listeners = Vec::new();
    for id in 1..=workers {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind worker");
        cfg.worker.push(WorkerEntry {
            id,
            listen: l.local_addr().expect("addr"),
        });
        listeners.push(l);
    }
    let dl = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind dispatcher");
    cfg.dispatcher.listen = dl.local_addr().expect("addr");
    tweak(&mut cfg);
    cfg.validate().expect("valid config");
    let cfg = Arc::new(cfg);
    let tracker = TaskTracker::new();
    let mut worker_stops = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u32 + 1;
        before_load(Some(id));
        let mut own = Config::clone(&cfg);
        worker_tweak(id, &mut own);
        own.validate().expect("valid worker config");
        let own = Arc::new(own);
        let (w, m) = Worker::load(id, own.clone(), OpRegistry::from_config(&own)).expect("worker");
        let acceptor = m
            .acceptor(Role::Worker, own.limits.handshake_timeout())
            .expect("acceptor");
        let stop = CancellationToken::new();
        tracker.spawn(worker::run(Arc::new(w), l, acceptor, stop.clone()));
        worker_stops.push(stop);
    }
    before_load(None);
    let (d, m) = Dispatcher::load(cfg.clone()).expect("dispatcher");
    let shutdown = CancellationToken::new();
    // As the binary does: the links to the workers outlive the dispatcher's drain.
    let links = CancellationToken::new();
    d.start_links(&m, &links, &tracker).expect("links");
    let acceptor = m
        .acceptor(Role::Dispatcher, cfg.limits.handshake_timeout())
        .expect("acceptor");
    tracker.spawn(dispatcher::run(d.clone(), dl, acceptor, shutdown.clone()));
    assert!(
        d.pool().wait_for_available(workers as usize, WAIT).await,
        "workers did not become available"
    );
    Cluster {
        addr: cfg.dispatcher.listen,
        worker_addrs: cfg.worker.iter().map(|w| w.listen).collect(),
        cfg,
        dispatcher: d,
        shutdown,
        links,
        worker_stops,
        tracker,
    }
}

impl Cluster {
    /// A library client with identity `stem`.
    pub async fn client_as(&self, pki: &Pki, stem: &str) -> Client {
        let m = pki.material(stem);
        let cfg = ClientConfig::new(&m, self.addr, SpiffeId::dispatcher("securesrv").unwrap())
            .expect("client config");
        Client::connect(cfg).await.expect("client connects")
    }

    /// The default client.
    pub async fn client(&self, pki: &Pki) -> Client {
        self.client_as(pki, "client").await
    }

    /// Tells the dispatcher to stop (graceful), as SIGTERM does.
    pub fn stop_dispatcher(&self) {
        self.shutdown.cancel();
    }

    /// Stops worker `id` (graceful).
    pub fn stop_worker(&self, id: u32) {
        self.worker_stops[id as usize - 1].cancel();
    }

    /// Starts worker `id` again on its address once its predecessor (told to stop with
    /// [`stop_worker`](Self::stop_worker)) has given the port up, as the watchdog would
    /// restart it.
    pub async fn restart_worker(&mut self, id: u32) {
        let addr = self.worker_addrs[id as usize - 1];
        let until = Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => assert!(Instant::now() < until, "{addr} never freed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let (w, m) =
            Worker::load(id, self.cfg.clone(), OpRegistry::from_config(&self.cfg)).expect("worker");
        let acceptor = m
            .acceptor(Role::Worker, self.cfg.limits.handshake_timeout())
            .expect("acceptor");
        let stop = CancellationToken::new();
        self.tracker
            .spawn(worker::run(Arc::new(w), listener, acceptor, stop.clone()));
        self.worker_stops[id as usize - 1] = stop;
    }

    /// Stops everything and waits (bounded).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.links.cancel();
        for s in &self.worker_stops {
            s.cancel();
        }
        self.tracker.close();
        let _ = tokio::time::timeout(WAIT, self.tracker.wait()).await;
    }
}

/// Output of a child process, collected by reader threads; waiters are woken on each line.
#[derive(Default)]
struct Output {
    /// stdout, stderr, and how many of the two pipes are still being read.
    text: Mutex<(String, String, usize)>,
    changed: Condvar,
}

/// A real `securesrv` process, killed (by PID) when dropped.
pub struct Proc {
    pub pid: u32,
    /// Its stdin, when piped: held open here (`Child::wait` would close it) until
    /// [`Proc::close_stdin`] or drop.
    stdin: Option<std::process::ChildStdin>,
    output: Arc<Output>,
    exit: mpsc::Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    name: String,
}

/// Makes the processes this test starts begin with SIGHUP at its default action even when the
/// test runner was started with it ignored (`nohup`), which they would inherit and keep: a
/// caught signal is reset to its default by `exec`, an ignored one is not. Tokio keeps its
/// handler installed for the life of the process.
pub fn children_get_default_sighup() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let _handler = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .expect("SIGHUP handler");
    });
}

/// Where every write fails, by name: `/dev/full` (ENOSPC) and a pipe whose reader has gone
/// (EPIPE), for a process's stdout or stderr.
pub fn unwritable() -> Vec<(&'static str, Stdio)> {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    // Close-on-exec: a process another test starts meanwhile must not inherit the read end
    // (and keep the pipe readable).
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    drop(read);
    vec![("/dev/full", full.into()), ("a closed pipe", write.into())]
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_securesrv")
}

impl Proc {
    /// Starts `securesrv args...` in `cwd` with stdin closed.
    pub fn spawn(name: &str, args: &[&str], cwd: &Path) -> Proc {
        Self::spawn_with(name, args, cwd, Stdio::null())
    }

    /// Starts `securesrv args...` with the given stdin.
    pub fn spawn_with(name: &str, args: &[&str], cwd: &Path, stdin: Stdio) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .current_dir(cwd)
            .env("SECURESRV_LOG", "info")
            .stdin(stdin);
        Self::spawn_command(name, cmd)
    }

    /// Starts `cmd` (set up by the caller: arguments, environment, stdin), reading its output.
    pub fn spawn_command(name: &str, cmd: Command) -> Proc {
        Self::spawn_command_to(name, cmd, Stdio::piped())
    }

    /// As [`Proc::spawn_command`], with stdout going to `stdout` (read only if piped).
    pub fn spawn_command_to(name: &str, mut cmd: Command, stdout: Stdio) -> Proc {
        let child = cmd
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn securesrv");
        Self::watch(name, child)
    }

    fn watch(name: &str, mut child: Child) -> Proc {
        let stdin = child.stdin.take();
        let output = Arc::new(Output::default());
        for (is_err, pipe) in [
            (
                false,
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            ),
            (
                true,
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            ),
        ] {
            let Some(pipe) = pipe else { continue };
            let out = output.clone();
            out.text.lock().unwrap().2 += 1;
            std::thread::spawn(move || {
                use std::io::BufRead;
                let reader = std::io::BufReader::new(pipe);
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    let mut t = out.text.lock().unwrap();
                    let s = if is_err { &mut t.1 } else { &mut t.0 };
                    s.push_str(&line);
                    s.push('\n');
                    out.changed.notify_all();
                }
                out.text.lock().unwrap().2 -= 1;
                out.changed.notify_all();
            });
        }
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send(status);
            }
        });
        Proc {
            pid,
            stdin,
            output,
            exit: rx,
            status: None,
            name: name.to_string(),
        }
    }

    /// Writes `bytes` to its stdin, which must be piped and open.
    #[allow(dead_code)]
    pub fn write_stdin(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin piped and open");
        stdin.write_all(bytes).expect("write to stdin");
        stdin.flush().expect("flush stdin");
    }

    /// Closes its stdin (end of input), if it was piped.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        self.output.text.lock().unwrap().0.clone()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.output.text.lock().unwrap().1.clone()
    }

    /// Waits until stdout (or stderr, with `in_stderr`) has `count` lines containing all of
    /// `needles`; returns the last such line. Panics with the output after `timeout`.
    pub fn wait_for_n(
        &self,
        in_stderr: bool,
        needles: &[&str],
        count: usize,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let mut t = self.output.text.lock().unwrap();
        loop {
            let text = if in_stderr { &t.1 } else { &t.0 };
            let hits: Vec<&str> = text
                .lines()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .collect();
            if hits.len() >= count {
                return hits[count - 1].to_string();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "{}: no {count} line(s) with {needles:?} within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.name, t.0, t.1
                );
            }
            t = self
                .output
                .changed
                .wait_timeout(t, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Waits for one line with all `needles` in stderr (the log).
    pub fn wait_log(&self, needles: &[&str], timeout: Duration) -> String {
        self.wait_for_n(true, needles, 1, timeout)
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid as i32), sig);
    }

    /// Sends `sig` to another process (a child of this one, found in its log).
    pub fn signal_pid(&self, pid: u32, sig: Signal) {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }

    /// Waits for the process to exit, up to `timeout`.
    /// Once it has exited, what it wrote before is read too: the readers get to the end of
    /// both pipes (bounded: a child of the process may still hold them open).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.exit.recv_timeout(timeout).ok();
            if self.status.is_some() {
                let deadline = Instant::now() + Duration::from_secs(2);
                let mut t = self.output.text.lock().unwrap();
                while t.2 > 0 && Instant::now() < deadline {
                    t = self
                        .output
                        .changed
                        .wait_timeout(t, deadline.saturating_duration_since(Instant::now()))
                        .unwrap()
                        .0;
                }
            }
        }
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.signal(Signal::SIGKILL);
            let _ = self.exit.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// Value of `key=` in a log line (e.g. `pid=1234`).
pub fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

/// The PID a test job wrote (as one line) to `path`, waiting for it up to `timeout`.
pub fn wait_pid_file(path: &Path, timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(pid) = text.strip_suffix('\n') {
            return pid.parse().expect("a pid");
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks `done` every 20 ms until it holds or `timeout` has passed; whether it held.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_until`] for async tests: looks at `done` every few milliseconds, without blocking
/// the runtime's thread, and panics with `what` after [`WAIT`].
pub async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends SIGSTOP to `pid` and waits until every thread of it has stopped: `kill` returns
/// before the stop takes effect, and a thread that is not stopped yet can still serve a
/// request (seen on a busy 2-vCPU machine).
pub fn stop_process(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
    let stopped = wait_until(Duration::from_secs(10), || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.filter_map(|t| t.ok()).all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().next());
                matches!(state, Some("T") | Some("t"))
            })
        })
    });
    assert!(stopped, "process {pid} did not stop within 10 s of SIGSTOP");
}

/// Whether a process with this PID still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the command name in parentheses.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}
