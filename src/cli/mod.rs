//! The `mayfly` command line. `main.rs` only calls [`run`].

pub mod agent;
pub mod client;
pub mod config_check;
pub mod credential;
pub mod credential_process;
pub mod dev;
pub mod dpop;
pub mod exec;
pub mod operator;
pub mod taskfile;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::audit::AuditEvent;
use crate::config::{App, Config};

#[derive(Parser)]
#[command(
    name = "mayfly",
    version,
    about = "Just-in-time, task-scoped credential broker"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker from a config file.
    Serve {
        #[arg(short, long, default_value = "config/mayfly.toml")]
        config: PathBuf,
    },
    /// Run a local development broker on embedded defaults (creates a dev PKI).
    Dev(dev::DevArgs),
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Config tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the OpenAPI spec of the HTTP API (as checked in at docs/openapi.json).
    Openapi,
    /// Agent: run CMD with a task's credentials in its environment; complete the task
    /// (revoking them) when CMD exits, and exit with its status.
    Exec(exec::ExecArgs),
    /// Agent: print an AWS `credential_process` document (for ~/.aws/config).
    CredentialProcess(credential_process::CredentialProcessArgs),
    /// Agent: DPoP keys and proofs (RFC 9449) for sender-constrained tokens.
    Dpop {
        #[command(subcommand)]
        command: dpop::DpopCmd,
    },
    /// Operator: leases (over mTLS; MAYFLY_ADDR, MAYFLY_CERT, MAYFLY_KEY, MAYFLY_CA).
    Lease {
        #[command(flatten)]
        conn: operator::Conn,
        #[command(subcommand)]
        command: operator::LeaseCmd,
    },
    /// Operator: tasks.
    Task {
        #[command(flatten)]
        conn: operator::Conn,
        #[command(subcommand)]
        command: operator::TaskCmd,
    },
    /// Operator: step-up approvals (list, approve, deny), shared by every replica.
    Approval {
        #[command(flatten)]
        conn: operator::Conn,
        #[command(subcommand)]
        command: operator::ApprovalCmd,
    },
    /// Operator: revoke everything of a principal, a provider or a target prefix.
    Revoke {
        #[command(flatten)]
        conn: operator::Conn,
        #[command(flatten)]
        args: operator::BulkArgs,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chain of an audit log; exits 1 naming the first bad line.
    ///
    /// PATH is the log's base path (its rotated files `PATH.NNNNNN` are verified with it,
    /// as one chain) or a directory (every `*.jsonl` log in it, each with its rotated
    /// files).
    Verify {
        #[arg(value_name = "PATH")]
        file: PathBuf,
        /// Also check the tail against the chain heads the brokers published: a Redis
        /// URL, a redb store file (broker stopped), or a broker config file (its
        /// `[store]`). A truncated or rewritten tail fails.
        #[arg(long, value_name = "STORE")]
        anchors: Option<String>,
        /// Key prefix of a Redis store given as a URL.
        #[arg(long, default_value = "mayfly")]
        key_prefix: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Parse and validate a config file (keys, types, durations, URLs), open every file
    /// and directory it names and load the policies, without starting; exits 1 listing
    /// every problem with its key.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse and strictly validate every *.cedar file in DIR against the schema.
    Check { dir: PathBuf },
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAYFLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: log files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub fn run() -> ExitCode {
    crate::install_crypto_provider();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    anchors,
                    key_prefix,
                },
        } => block_on(false, verify_audit(file, anchors, key_prefix)),
        Command::Policy {
            command: PolicyCommand::Check { dir },
        } => match crate::policy::PolicyEngine::load(&dir) {
            Ok(engine) => {
                println!("ok: {} policies valid", engine.policy_count());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("policy check failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => runtime_then(async move {
            let config = Config::load(&config)?;
            let listener = bind(config.listen).await?;
            let app = config.build().await?;
            serve(app, listener, |_| {}).await
        }),
        Command::Dev(args) => runtime_then(dev::run(args)),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match config_check::check(&file) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("config check failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Openapi => {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::api::openapi::spec()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Command::Lease { conn, command } => client_then(operator::lease(conn, command)),
        Command::Task { conn, command } => client_then(operator::task(conn, command)),
        Command::Revoke { conn, args } => client_then(operator::bulk(conn, args)),
        Command::Approval { conn, command } => client_then(operator::approval(conn, command)),
        Command::Exec(args) => block_on(false, exec::run(args)),
        Command::CredentialProcess(args) => client_then(credential_process::run(args)),
        Command::Dpop { command } => match dpop::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mayfly dpop: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The log sets at `path`: the set of a base path, or of every `*.jsonl` in a directory
/// (a rotated file whose base is gone still counts).
fn audit_sets(path: &std::path::Path) -> std::io::Result<Vec<(PathBuf, Vec<PathBuf>)>> {
    if !path.is_dir() {
        return Ok(vec![(path.to_path_buf(), crate::audit::log_set(path)?)]);
    }
    let mut bases = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".jsonl") {
            bases.insert(p.clone());
        } else if let Some((base, index)) = name.rsplit_once('.')
            && base.ends_with(".jsonl")
            && index.len() == 6
            && index.bytes().all(|b| b.is_ascii_digit())
        {
            bases.insert(path.join(base));
        }
    }
    bases
        .into_iter()
        .map(|b| crate::audit::log_set(&b).map(|files| (b, files)))
        .collect()
}

async fn verify_audit(
    path: PathBuf,
    anchors: Option<String>,
    key_prefix: String,
) -> Result<(), String> {
    let fail = |m: String| m;
    let anchors = match anchors {
        None => Vec::new(),
        Some(location) => {
            let store = if location.ends_with(".toml") {
                Config::load(std::path::Path::new(&location))
                    .map_err(|e| fail(e.to_string()))?
                    .store
            } else {
                crate::config::StoreConfig::from_location(&location, &key_prefix)
                    .map_err(|e| fail(e.to_string()))?
            };
            let store = store
                .open()
                .await
                .map_err(|e| fail(format!("cannot open the anchor store: {e}")))?;
            store
                .anchors()
                .await
                .map_err(|e| fail(format!("cannot read anchors: {e}")))?
        }
    };
    let sets = audit_sets(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    if sets.iter().all(|(_, files)| files.is_empty()) {
        return Err(fail(format!("{}: no audit log files", path.display())));
    }
    for (base, files) in sets {
        if files.is_empty() {
            continue;
        }
        match crate::audit::verify_set(&files, &anchors) {
            Ok(v) => println!(
                "ok: {}: {} records in {} file(s), seq {}..={}, chain intact{}",
                base.display(),
                v.records,
                v.files,
                v.first_seq,
                v.head.seq,
                if v.anchored.is_empty() {
                    String::new()
                } else {
                    format!("; tail matches the anchor of {}", v.anchored.join(", "))
                }
            ),
            Err(e) => {
                return Err(fail(format!(
                    "audit verify failed: {}: {e}",
                    base.display()
                )));
            }
        }
    }
    Ok(())
}

/// Runs a command's future on a fresh runtime: multi-threaded for the server, one thread
/// for client commands. `Ok` exits as the command says (`()` is success); errors print as
/// `mayfly: …` and exit 1.
fn block_on<T: std::process::Termination, E: std::fmt::Display>(
    server: bool,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> ExitCode {
    let mut builder = if server {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mayfly: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(done) => done.report(),
        Err(e) => {
            eprintln!("mayfly: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime_then(fut: impl std::future::Future<Output = Result<(), crate::Error>>) -> ExitCode {
    block_on(true, fut)
}

fn client_then(fut: impl std::future::Future<Output = Result<(), client::CliError>>) -> ExitCode {
    block_on(false, fut)
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Io {
            context: format!("cannot listen on {addr}"),
            source,
        })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reloads policies on SIGHUP and when the files change; a bad set is refused, logged,
/// audited, and the last good set stays in force.
fn spawn_policy_reloader(app: &App) {
    let policy = app.policy.clone();
    let audit = app.audit.clone();
    let every = app.config.policy_reload;
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(every);
        loop {
            let forced;
            #[cfg(unix)]
            {
                forced = match hup.as_mut() {
                    Some(h) => tokio::select! {
                        _ = tick.tick() => false,
                        _ = h.recv() => true,
                    },
                    None => {
                        tick.tick().await;
                        false
                    }
                };
            }
            #[cfg(not(unix))]
            {
                tick.tick().await;
                forced = false;
            }
            if !forced && !policy.changed_on_disk() {
                continue;
            }
            let p = policy.clone();
            let result = tokio::task::spawn_blocking(move || p.reload()).await;
            let mut ev = AuditEvent::new("policy.reload");
            match result {
                Ok(Ok(n)) => {
                    metrics::counter!("mayfly_policy_reloads_total", "outcome" => "loaded")
                        .increment(1);
                    tracing::info!(policies = n, "policies reloaded");
                    ev.outcome = Some(format!("loaded {n} policies"));
                }
                Ok(Err(e)) => {
                    metrics::counter!("mayfly_policy_reloads_total", "outcome" => "refused")
                        .increment(1);
                    tracing::error!(error = %e, "policy reload refused; keeping the last good set");
                    ev.outcome = Some("refused; last good set kept".into());
                    ev.detail = Some(e.to_string());
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy reload task failed");
                    continue;
                }
            }
            if let Err(e) = audit.write(ev).await {
                tracing::error!(error = %e, "cannot audit policy reload");
            }
        }
    });
}

/// Re-reads the X.509 trust bundles and the serving certificate when their files change
/// (SPIRE and cert-manager rotate them); a bad new file is refused and the last good
/// one stays in force.
fn spawn_bundle_refresher(app: &App) {
    let (bundles, serving) = (app.bundles.clone(), app.serving.clone());
    let every = app.config.policy_reload;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let (b, c) = (bundles.clone(), serving.clone());
            let done = tokio::task::spawn_blocking(move || {
                (
                    b.refresh().map_err(|e| e.to_string()),
                    c.refresh().map_err(|e| e.to_string()),
                )
            })
            .await;
            let Ok((bundle, cert)) = done else { continue };
            match bundle {
                Ok(true) => {
                    file_reloaded("mayfly_trust_bundle_file_reloads_total", "loaded");
                    tracing::info!("trust bundles reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    file_reloaded("mayfly_trust_bundle_file_reloads_total", "refused");
                    tracing::error!(error = %e, "trust bundle reload refused; keeping the last good set")
                }
            }
            match cert {
                Ok(true) => {
                    file_reloaded("mayfly_serving_cert_reloads_total", "loaded");
                    tracing::info!("serving certificate reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    file_reloaded("mayfly_serving_cert_reloads_total", "refused");
                    tracing::error!(error = %e, "serving certificate reload refused; keeping the current one")
                }
            }
        }
    });
}

/// Counts a reload of a watched file by outcome, so a refused file is visible (and
/// testable) without reading logs.
fn file_reloaded(series: &'static str, outcome: &'static str) {
    metrics::counter!(series, "outcome" => outcome).increment(1);
}

/// Runs a built broker on `listener` until SIGINT/SIGTERM. `on_ready` sees the bound
/// address once the reaper and reloader run.
pub async fn serve(
    app: App,
    listener: TcpListener,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), crate::Error> {
    let addr = listener.local_addr().map_err(|source| crate::Error::Io {
        context: "listener address".into(),
        source,
    })?;
    let mut started = AuditEvent::new("broker.started");
    started.detail = Some(format!("listening on {addr}"));
    app.audit.write(started).await?;
    crate::metrics::handle();
    let reaper = app.revoker.clone().spawn_reaper();
    spawn_bundle_refresher(&app);
    spawn_policy_reloader(&app);
    let state = AppState::with_edge(
        app.broker.clone(),
        app.bearer.clone(),
        app.config.max_body_bytes,
        &app.config.edge,
    );
    let refusals = state.refusals.clone();
    let summaries = crate::audit::spawn_summary_flusher(
        refusals.clone(),
        app.audit.clone(),
        app.config.summary_interval,
    );
    let anchors = crate::audit::spawn_anchor_publisher(
        app.audit.clone(),
        app.store.clone(),
        app.config.anchor_interval,
    );
    let router = api::shed::limit_in_flight(
        api::router(state),
        app.config.max_in_flight,
        api::shed::BodyLimits {
            max_bytes: app.config.max_body_bytes,
            timeout: app.config.edge.body_read_timeout,
        },
    );
    tracing::info!(%addr, node = %app.config.node_id, "mayfly listening (mTLS)");
    on_ready(addr);
    api::tls::serve(
        listener,
        app.tls.clone(),
        Arc::clone(&app.bundles),
        router,
        api::tls::ServeOptions {
            max_connections: app.config.max_connections,
            handshake_timeout: app.config.handshake_timeout,
            edge: app.config.edge.clone(),
        },
        shutdown_signal(),
    )
    .await;
    reaper.abort();
    summaries.abort();
    anchors.abort();
    // What the last interval counted, and the final head, are not lost with the process.
    if let Err(e) = refusals.flush(&app.audit).await {
        tracing::error!(error = %e, "cannot write the last refusal summaries");
    }
    crate::audit::publish_anchor(&app.audit, app.store.as_ref(), 0).await;
    tracing::info!("mayfly stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks argument ids, groups and defaults only when a command is built;
        // this builds every subcommand.
        Cli::command().debug_assert();
    }
}
