//! `mayfly exec --task FILE -- CMD ARGS…`: declare the file's task, fetch its
//! credentials, run CMD with them in its environment, and complete the task when CMD
//! exits — on every path after the declaration, so every lease of the task is revoked.
//!
//! Order matters:
//! 1. the task file and the variable names are checked before anything is declared;
//! 2. signal handlers go in before the declaration, so SIGINT/SIGTERM/SIGHUP/SIGQUIT can
//!    no longer end `mayfly` with the task active;
//! 3. CMD runs directly (no shell) with the inherited environment plus the credentials;
//!    those signals are forwarded to it, and `mayfly` waits for it to exit;
//! 4. the task is completed, and `mayfly` exits with CMD's status (128+N if a signal N
//!    killed it).
//!
//! Only a SIGKILL of `mayfly` itself skips step 4; the task then ends at its TTL.

use clap::Args;
use rustix::process::{Pid, Signal, kill_process};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, ExitCode, ExitStatus};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

use crate::task::{ProviderKind, TaskId};

use super::agent;
use super::client::{Agent, CliError, Client, Conn};
use super::credential::{self, Entry, EnvVar, Kind, Minted};
use super::taskfile::TaskFile;

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The task file: the task to declare and the credentials to fetch (see docs/cli.md).
    #[arg(long, value_name = "FILE")]
    pub task: PathBuf,
    /// Prefix of the variables Mayfly names itself: {P}TASK_ID, {P}TOKEN,
    /// {P}TOKEN_<TARGET>, {P}VAULT_<TARGET>. AWS_* and VAULT_TOKEN keep their names.
    #[arg(long, value_name = "P", default_value = "MAYFLY_")]
    pub env_prefix: String,
    /// Print the task id, lease ids and variable names (never values) on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// Also write each variable to DIR/NAME (mode 0600; CMD finds DIR in
    /// {P}CREDENTIALS_DIR), and when the client certificate (--cert) rotates, fetch the
    /// jwt credentials again with the new one and rewrite their files: a token is bound
    /// to the certificate it was minted for (RFC 8705), so after a rotation only a new
    /// token works.
    #[arg(long, value_name = "DIR")]
    pub refresh_dir: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
    // Last: its help heading covers the flags after it.
    #[command(flatten)]
    pub conn: Conn<Agent>,
}

/// The signals `exec` handles while it runs.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    /// SIGCHLD: CMD may have exited. Registered before CMD starts, so no exit is missed.
    child: tokio::signal::unix::Signal,
    /// Our process group is the terminal's foreground group. CMD shares it, so a
    /// keyboard SIGINT or SIGQUIT (Ctrl-C, Ctrl-\) has already reached CMD; forwarding it
    /// would deliver it twice, which tools read as "abort now" (terraform, for one).
    keyboard_reaches_child: bool,
}

impl Signals {
    fn install() -> Result<Self, CliError> {
        let on = |kind: SignalKind| {
            signal(kind).map_err(|source| CliError::Io {
                context: "cannot install signal handlers".into(),
                source,
            })
        };
        Ok(Self {
            int: on(SignalKind::interrupt())?,
            term: on(SignalKind::terminate())?,
            hup: on(SignalKind::hangup())?,
            quit: on(SignalKind::quit())?,
            child: on(SignalKind::child())?,
            keyboard_reaches_child: rustix::termios::tcgetpgrp(std::io::stdin())
                .is_ok_and(|group| group == rustix::process::getpgrp()),
        })
    }

    /// The next SIGINT, SIGTERM, SIGHUP or SIGQUIT.
    async fn next(
        int: &mut tokio::signal::unix::Signal,
        term: &mut tokio::signal::unix::Signal,
        hup: &mut tokio::signal::unix::Signal,
        quit: &mut tokio::signal::unix::Signal,
    ) -> Signal {
        tokio::select! {
            _ = int.recv() => Signal::INT,
            _ = term.recv() => Signal::TERM,
            _ = hup.recv() => Signal::HUP,
            _ = quit.recv() => Signal::QUIT,
        }
    }

    async fn forwarded(&mut self) -> Signal {
        Self::next(&mut self.int, &mut self.term, &mut self.hup, &mut self.quit).await
    }

    fn forwards(&self, sig: Signal) -> bool {
        !(self.keyboard_reaches_child && (sig == Signal::INT || sig == Signal::QUIT))
    }
}

fn signal_name(sig: Signal) -> &'static str {
    match sig {
        Signal::INT => "SIGINT",
        Signal::TERM => "SIGTERM",
        Signal::HUP => "SIGHUP",
        Signal::QUIT => "SIGQUIT",
        _ => "a signal",
    }
}

fn signal_exit(sig: i32) -> u8 {
    u8::try_from(128 + sig).unwrap_or(u8::MAX)
}

/// How the part after the declaration ended.
enum Ended {
    Exited(ExitStatus),
    /// A signal arrived before CMD started.
    Interrupted(Signal),
    /// Fetching a credential, building the environment or starting CMD failed.
    Failed(CliError),
}

struct Run<'a> {
    args: &'a ExecArgs,
    file: &'a TaskFile,
    task: &'a TaskId,
    /// Files written under `--refresh-dir`, removed when the run ends.
    written: std::sync::Mutex<std::collections::BTreeSet<PathBuf>>,
}

impl Run<'_> {
    fn say(&self, msg: std::fmt::Arguments) {
        if self.args.verbose {
            eprintln!("mayfly: {msg}");
        }
    }

    /// Fetches every credential of the task file, or, with `keep`, only the jwt ones
    /// (bound to the client certificate) and keeps the others.
    async fn fetch(
        &self,
        client: &Client,
        keep: Option<Vec<(String, Minted)>>,
    ) -> Result<Vec<(String, Minted)>, CliError> {
        let mut kept = keep.map(Vec::into_iter);
        let mut minted = Vec::with_capacity(self.file.credentials.len());
        for spec in &self.file.credentials {
            let previous = kept.as_mut().and_then(Iterator::next);
            if let Some(p) = previous
                && spec.request.provider != ProviderKind::Jwt
            {
                minted.push(p);
                continue;
            }
            let view = agent::request(client, self.task, spec).await?;
            let m = Minted::from_view(&view, spec.request.provider)?;
            let lease = view["lease_id"].as_str().unwrap_or("?");
            let label = format!("{} (lease {lease})", spec.key());
            self.say(format_args!("got {label}"));
            minted.push((label, m));
        }
        Ok(minted)
    }

    fn place(&self, minted: &[(String, Minted)]) -> Result<Vec<EnvVar>, CliError> {
        let placed: Vec<(Entry, &Minted)> = self
            .file
            .credentials
            .iter()
            .zip(minted)
            .map(|(spec, (label, m))| {
                let entry = Entry {
                    label,
                    kind: m.kind(),
                    target: &spec.request.target,
                    naming: &spec.naming,
                };
                (entry, m)
            })
            .collect();
        Ok(credential::child_env(
            &self.args.env_prefix,
            self.task.as_str(),
            &placed,
        )?)
    }

    async fn after_declaring(&self, client: &Client, signals: &mut Signals) -> Ended {
        let cert_seen = cert_digest(&self.args.conn.cert);
        let minted = tokio::select! {
            m = self.fetch(client, None) => m,
            sig = signals.forwarded() => return Ended::Interrupted(sig),
        };
        let minted = match minted {
            Ok(m) => m,
            Err(e) => return Ended::Failed(e),
        };
        let mut env = match self.place(&minted) {
            Ok(env) => env,
            Err(e) => return Ended::Failed(e),
        };
        let mut refresh = None;
        if let Some(dir) = &self.args.refresh_dir {
            if let Err(e) = self.write_dir(dir, &env) {
                return Ended::Failed(e);
            }
            env.push(EnvVar {
                name: format!("{}CREDENTIALS_DIR", self.args.env_prefix),
                value: crate::secret::Secret::new(dir.to_string_lossy().into_owned()),
                from: "--refresh-dir".into(),
            });
            // A bearer-token caller has no certificate to rotate.
            if self.args.conn.token_file.is_none() {
                refresh = Some(Refresh {
                    dir: dir.clone(),
                    cert_seen,
                    minted,
                });
            }
        }
        for v in &env {
            self.say(format_args!("set {} from {}", v.name, v.from));
        }
        let Some((program, rest)) = self.args.command.split_first() else {
            return Ended::Failed(CliError::Usage("no command given after --"));
        };
        let spawned = std::process::Command::new(program)
            .args(rest)
            .envs(env.iter().map(|v| (&v.name, v.value.expose())))
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(source) => {
                return Ended::Failed(CliError::Io {
                    context: format!("cannot run {}", program.to_string_lossy()),
                    source,
                });
            }
        };
        match self.supervise(child, signals, refresh).await {
            Ok(status) => Ended::Exited(status),
            Err(e) => Ended::Failed(e),
        }
    }

    /// Waits for CMD, forwarding signals. Only this loop reaps CMD, and it always tries
    /// to reap before signalling: a reaped pid may already belong to another process.
    async fn supervise(
        &self,
        mut child: Child,
        signals: &mut Signals,
        mut refresh: Option<Refresh>,
    ) -> Result<ExitStatus, CliError> {
        let mut tick = tokio::time::interval(ROTATION_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pid = Pid::from_child(&child);
        let mut reap = move || {
            child.try_wait().map_err(|source| CliError::Io {
                context: "waiting for the command".into(),
                source,
            })
        };
        loop {
            if let Some(status) = reap()? {
                return Ok(status);
            }
            let sig = tokio::select! {
                _ = signals.child.recv() => continue,
                _ = tick.tick(), if refresh.is_some() => {
                    if let Some(r) = refresh.as_mut() {
                        self.refresh_if_rotated(r).await;
                    }
                    continue;
                }
                sig = Signals::next(&mut signals.int, &mut signals.term, &mut signals.hup, &mut signals.quit) => sig,
            };
            if let Some(status) = reap()? {
                return Ok(status);
            }
            if !signals.forwards(sig) {
                continue;
            }
            match kill_process(pid, sig) {
                Ok(()) => self.say(format_args!(
                    "forwarded {} to pid {}",
                    signal_name(sig),
                    pid.as_raw_nonzero()
                )),
                Err(e) => eprintln!(
                    "mayfly: cannot forward {} to the command: {e}",
                    signal_name(sig)
                ),
            }
        }
    }
}

/// How often `--refresh-dir` looks at the client certificate file.
const ROTATION_CHECK: Duration = Duration::from_secs(1);

/// `--refresh-dir` state: the certificate the current tokens are bound to, and them.
struct Refresh {
    dir: PathBuf,
    cert_seen: Option<[u8; 32]>,
    minted: Vec<(String, Minted)>,
}

/// SHA-256 of the certificate file's bytes (`None` while it cannot be read).
fn cert_digest(path: &std::path::Path) -> Option<[u8; 32]> {
    use sha2::Digest;
    std::fs::read(path)
        .ok()
        .map(|b| sha2::Sha256::digest(b).into())
}

impl Run<'_> {
    /// Writes each variable to `dir/NAME`, mode 0600, each by an atomic rename so CMD
    /// never reads half a token.
    fn write_dir(&self, dir: &std::path::Path, env: &[EnvVar]) -> Result<(), CliError> {
        let io = |context: String| move |source| CliError::Io { context, source };
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        for v in env {
            let (tmp, path) = (dir.join(format!(".{}.tmp", v.name)), dir.join(&v.name));
            self.remember(tmp.clone());
            crate::secret::write_private_file(&tmp, v.value.expose().as_bytes())
                .map_err(io(format!("cannot write {}", tmp.display())))?;
            self.remember(path.clone());
            std::fs::rename(&tmp, &path).map_err(io(format!("cannot write {}", path.display())))?;
        }
        Ok(())
    }

    fn remember(&self, path: PathBuf) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path);
    }

    /// Removes the credential files once the task has ended: their tokens are revoked,
    /// but an offline verifier would accept one until its `exp`.
    fn remove_written(&self) {
        let written = std::mem::take(&mut *self.written.lock().unwrap_or_else(|p| p.into_inner()));
        for path in written {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("mayfly: cannot remove {}: {e}", path.display()),
            }
        }
    }

    /// After an SVID rotation (the --cert file changed), fetches the jwt credentials
    /// again over a connection with the new certificate and rewrites their files. A
    /// half-written rotation (certificate and key not matching yet) fails to connect and
    /// is retried at the next check.
    async fn refresh_if_rotated(&self, r: &mut Refresh) {
        let now = cert_digest(&self.args.conn.cert);
        if now.is_none() || now == r.cert_seen {
            return;
        }
        let fetched = match Client::new(&self.args.conn) {
            Ok(client) => {
                self.fetch(&client, Some(std::mem::take(&mut r.minted)))
                    .await
            }
            Err(e) => Err(e),
        };
        let written = fetched.and_then(|m| {
            let env = self.place(&m)?;
            r.minted = m;
            self.write_dir(&r.dir, &env)
        });
        match written {
            Ok(()) => {
                r.cert_seen = now;
                self.say(format_args!(
                    "the client certificate rotated; credentials refetched into {}",
                    r.dir.display()
                ));
            }
            Err(e) => eprintln!(
                "mayfly: the client certificate rotated but refetching credentials failed: {e}; retrying"
            ),
        }
    }
}

/// Checks, before declaring, the variable names that do not depend on the minted
/// credential (a vault credential is a token or a secret only once minted).
fn check_names(prefix: &str, file: &TaskFile) -> Result<(), CliError> {
    let labels: Vec<String> = file.credentials.iter().map(|c| c.key()).collect();
    let entries: Vec<Entry> = file
        .credentials
        .iter()
        .zip(&labels)
        .filter_map(|(spec, label)| {
            let kind = match spec.request.provider {
                ProviderKind::Jwt => Kind::Jwt,
                ProviderKind::Aws => Kind::Aws,
                ProviderKind::Vault => return None,
            };
            Some(Entry {
                label,
                kind,
                target: &spec.request.target,
                naming: &spec.naming,
            })
        })
        .collect();
    Ok(credential::check_names(prefix, &entries)?)
}

/// Completes the task with a fresh client: a long-running CMD may outlive the
/// certificate or token the task was declared with (SPIRE rotates them on disk). A
/// transport failure is retried; the broker's answer is not.
async fn complete(conn: &Conn<Agent>, task: &TaskId) -> Result<u64, CliError> {
    let mut attempt = 1;
    loop {
        let result = match Client::new(conn) {
            Ok(client) => agent::complete(&client, task).await,
            Err(e) => Err(e),
        };
        match result {
            Err(CliError::Transport { .. }) if attempt < 3 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

pub async fn run(args: ExecArgs) -> Result<ExitCode, CliError> {
    let file = TaskFile::load(&args.task)?;
    check_names(&args.env_prefix, &file)?;
    let mut signals = Signals::install()?;
    let client = Client::new(&args.conn)?;
    let task = agent::declare(&client, &file).await?;
    let run = Run {
        args: &args,
        file: &file,
        task: &task,
        written: Default::default(),
    };
    run.say(format_args!("declared task {task}"));
    let ended = run.after_declaring(&client, &mut signals).await;
    let completed = complete(&args.conn, &task).await;
    run.remove_written();
    Ok(finish(ended, completed, &run))
}

fn finish(ended: Ended, completed: Result<u64, CliError>, run: &Run) -> ExitCode {
    let task = run.task;
    let code = match ended {
        Ended::Exited(status) => {
            use std::os::unix::process::ExitStatusExt;
            run.say(format_args!("the command ended: {status}"));
            match (status.code(), status.signal()) {
                (Some(code), _) => u8::try_from(code).unwrap_or(1),
                (None, Some(sig)) => signal_exit(sig),
                (None, None) => 1,
            }
        }
        Ended::Interrupted(sig) => {
            eprintln!(
                "mayfly: {} before the command started; ending task {task}",
                signal_name(sig)
            );
            signal_exit(sig.as_raw())
        }
        Ended::Failed(e) => {
            eprintln!("mayfly: {e}; ending task {task}");
            match &e {
                // As shells do: 127 not found, 126 found but not runnable.
                CliError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 127,
                CliError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    126
                }
                _ => 1,
            }
        }
    };
    match completed {
        Ok(revoked) => {
            run.say(format_args!(
                "completed task {task}; {revoked} lease(s) revoked"
            ));
            ExitCode::from(code)
        }
        // Ended meanwhile (an operator revoked it, or its TTL passed): nothing is left.
        Err(e) if matches!(e.code(), Some("task_not_active" | "task_expired")) => {
            eprintln!("mayfly: task {task} had already ended ({e})");
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("mayfly: ERROR: task {task} was NOT completed: {e}");
            eprintln!(
                "mayfly: its credentials stay valid until they expire; end them with `mayfly task complete {task}` (as this agent) or `mayfly task revoke {task} --reason …` (operator)"
            );
            ExitCode::from(if code == 0 { 1 } else { code })
        }
    }
}
