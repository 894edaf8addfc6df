//! The HTTP client every client-side command shares: connection flags, mTLS or bearer
//! authentication, and problem+json errors carried through with their `code`.
//!
//! Operator commands and agent helpers (`exec`, `credential-process`) take the same flags
//! and variables; only the default client certificate differs (the dev operator SVID or
//! the dev agent SVID), chosen by the type parameter of [`Conn`].

use clap::Args;
use serde_json::Value;
use std::marker::PhantomData;
use std::path::PathBuf;

/// Which dev identity a command presents when `--cert`/`--key` are not given.
pub trait DefaultIdentity: Clone + Default + Send + Sync + 'static {
    const CERT: &'static str;
    const KEY: &'static str;
}

/// Operator commands default to `mayfly dev`'s operator SVID.
#[derive(Debug, Clone, Default)]
pub struct Operator;

impl DefaultIdentity for Operator {
    const CERT: &'static str = ".mayfly-dev/operator.pem";
    const KEY: &'static str = ".mayfly-dev/operator-key.pem";
}

/// Agent helpers default to `mayfly dev`'s demo agent SVID.
#[derive(Debug, Clone, Default)]
pub struct Agent;

impl DefaultIdentity for Agent {
    const CERT: &'static str = ".mayfly-dev/agent.pem";
    const KEY: &'static str = ".mayfly-dev/agent-key.pem";
}

/// How to reach and authenticate to the broker.
#[derive(Args, Debug, Clone)]
#[group(id = "connection")]
#[command(next_help_heading = "Connection")]
pub struct Conn<I: DefaultIdentity> {
    /// Broker URL.
    #[arg(
        long,
        env = "MAYFLY_ADDR",
        default_value = "https://127.0.0.1:8443",
        global = true
    )]
    pub addr: String,
    /// Client certificate (PEM), an X.509-SVID. Defaults to the dev operator SVID for
    /// operator commands and the dev agent SVID for exec and credential-process.
    #[arg(long, env = "MAYFLY_CERT", default_value = I::CERT, global = true)]
    pub cert: PathBuf,
    /// Private key of --cert (PEM).
    #[arg(long, env = "MAYFLY_KEY", default_value = I::KEY, global = true)]
    pub key: PathBuf,
    /// CA bundle to verify the broker (PEM).
    #[arg(
        long,
        env = "MAYFLY_CA",
        default_value = ".mayfly-dev/ca.pem",
        global = true
    )]
    pub ca: PathBuf,
    /// Authenticate with the token in this file (a JWT-SVID or OIDC token, sent as
    /// `Authorization: Bearer`) instead of a client certificate. Re-read for every
    /// request, so a rotated token is picked up.
    #[arg(long, env = "MAYFLY_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    #[arg(skip)]
    pub identity: PhantomData<I>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(&'static str),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("cannot reach the broker at {addr}: {reason}")]
    Transport { addr: String, reason: String },
    #[error("{status} {code}: {detail}")]
    Api {
        status: u16,
        code: String,
        detail: String,
    },
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("unexpected answer from the broker: {0}")]
    Unexpected(String),
    #[error(transparent)]
    TaskFile(#[from] super::taskfile::TaskFileError),
    #[error(transparent)]
    Credential(#[from] super::credential::ShapeError),
    #[error(transparent)]
    Env(#[from] super::credential::EnvError),
}

impl CliError {
    /// The broker's problem `code`, for errors that came from the API.
    pub fn code(&self) -> Option<&str> {
        match self {
            CliError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A broker answer that is not an error: its status and JSON body.
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token_file: Option<PathBuf>,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::File {
        path: path.clone(),
        source,
    })
}

impl Client {
    pub fn new<I: DefaultIdentity>(c: &Conn<I>) -> Result<Self, CliError> {
        let ca = reqwest::Certificate::from_pem(&read(&c.ca)?)
            .map_err(|e| CliError::Tls(e.to_string()))?;
        let mut builder = reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(std::time::Duration::from_secs(30));
        // A bearer token replaces the certificate: the broker refuses a request carrying
        // both (`ambiguous_credentials`).
        if c.token_file.is_none() {
            let mut pem = read(&c.cert)?;
            pem.extend(read(&c.key)?);
            let identity =
                reqwest::Identity::from_pem(&pem).map_err(|e| CliError::Tls(e.to_string()))?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(|e| CliError::Tls(e.to_string()))?;
        Ok(Self {
            http,
            base: c.addr.trim_end_matches('/').to_string(),
            token_file: c.token_file.clone(),
        })
    }

    fn bearer(&self, req: reqwest::RequestBuilder) -> Result<reqwest::RequestBuilder, CliError> {
        let Some(path) = &self.token_file else {
            return Ok(req);
        };
        let bytes = read(path)?;
        let token = String::from_utf8_lossy(&bytes).trim().to_string();
        if token.is_empty() {
            return Err(CliError::EmptyToken(path.clone()));
        }
        Ok(req.bearer_auth(token))
    }

    /// Sends a request; a status of 300 or more becomes [`CliError::Api`] with the
    /// problem's `code`.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<Answer, CliError> {
        let resp = self
            .bearer(req)?
            .send()
            .await
            .map_err(|e| CliError::Transport {
                addr: self.base.clone(),
                reason: e.to_string(),
            })?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status >= 300 {
            return Err(CliError::Api {
                status,
                code: body["code"].as_str().unwrap_or("unknown").to_string(),
                detail: body["detail"].as_str().unwrap_or_default().to_string(),
            });
        }
        Ok(Answer { status, body })
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        let req = self.http.get(format!("{}{path}", self.base)).query(query);
        Ok(self.send(req).await?.body)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, CliError> {
        Ok(self.post_answer(path, body).await?.body)
    }

    pub async fn post_answer(&self, path: &str, body: Value) -> Result<Answer, CliError> {
        let req = self.http.post(format!("{}{path}", self.base)).json(&body);
        self.send(req).await
    }

    pub async fn get_answer(&self, path: &str) -> Result<Answer, CliError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// Follows `next` cursors until the last page.
    pub async fn all(
        &self,
        path: &str,
        mut query: Vec<(&str, String)>,
    ) -> Result<Vec<Value>, CliError> {
        let mut out = Vec::new();
        query.push(("limit", "500".into()));
        loop {
            let page = self.get(path, &query).await?;
            out.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next"].as_str() {
                Some(n) => {
                    query.retain(|(k, _)| *k != "after");
                    query.push(("after", n.to_string()));
                }
                None => return Ok(out),
            }
        }
    }
}
