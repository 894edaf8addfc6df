//! Serving a built [`App`]: the mTLS listener with its edge limits, and beside it the
//! reaper, the policy and bundle reloaders, the refusal summaries and the audit anchor,
//! until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

use super::App;
use crate::api::{self, AppState};
use crate::audit::AuditEvent;

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
    // A journaled log's file lags its commits by a batch: the final anchor is the head
    // once the file holds every record.
    if let Err(e) = app.audit.flush().await {
        tracing::error!(error = %e, "the audit file did not catch up with its journal before stopping");
    }
    crate::audit::publish_anchor(&app.audit, app.store.as_ref(), 0).await;
    tracing::info!("mayfly stopped");
    Ok(())
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
