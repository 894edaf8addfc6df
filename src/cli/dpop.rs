//! `mayfly dpop`: the client side of RFC 9449 for shell scripts and CI. `keygen` writes
//! a key, `proof` prints a proof for one request, `thumbprint` prints the key's `jkt`
//! (what `cnf.jkt` of a token bound to it says).

use clap::{Args, Subcommand};
use std::path::PathBuf;

use crate::identity::dpop::{ProofKey, ProofRequest, normalize_htu};

#[derive(Subcommand)]
pub enum DpopCmd {
    /// Write a new DPoP private key (PKCS#8 PEM, mode 0600) and print its thumbprint.
    Keygen {
        /// Where to write the key; refused if the file exists.
        #[arg(long)]
        out: PathBuf,
        /// Ed25519 (EdDSA) instead of P-256 (ES256).
        #[arg(long)]
        ed25519: bool,
    },
    /// Print a DPoP proof (the value of the `DPoP` header) for one request.
    Proof(ProofArgs),
    /// Print the RFC 7638 thumbprint (`jkt`) of a key's public part.
    Thumbprint {
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Args)]
pub struct ProofArgs {
    /// The private key (PKCS#8 PEM: P-256 or Ed25519), e.g. from `mayfly dpop keygen`.
    #[arg(long)]
    key: PathBuf,
    /// The request's HTTP method (`htm`).
    #[arg(long, default_value = "POST")]
    method: String,
    /// The request's URL (`htu`; query and fragment are dropped).
    #[arg(long)]
    url: String,
    /// The access token sent with the request: the proof carries its hash (`ath`).
    #[arg(long)]
    access_token: Option<String>,
    /// The server's nonce from its last `DPoP-Nonce` header.
    #[arg(long)]
    nonce: Option<String>,
}

fn load(path: &PathBuf) -> Result<ProofKey, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    ProofKey::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn run(cmd: DpopCmd) -> Result<(), String> {
    match cmd {
        DpopCmd::Keygen { out, ed25519 } => {
            if out.exists() {
                return Err(format!("{} exists; not overwritten", out.display()));
            }
            let (key, pem) = ProofKey::generate(ed25519)?;
            crate::secret::write_private_file(&out, pem.expose().as_bytes())
                .map_err(|e| format!("{}: {e}", out.display()))?;
            println!("{}", key.thumbprint());
            Ok(())
        }
        DpopCmd::Thumbprint { key } => {
            println!("{}", load(&key)?.thumbprint());
            Ok(())
        }
        DpopCmd::Proof(a) => {
            let key = load(&a.key)?;
            if a.method.is_empty() || !a.method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("--method {:?} is not an HTTP method", a.method));
            }
            let url = normalize_htu(&a.url)
                .ok_or_else(|| format!("--url {:?} is not an absolute http(s) URL", a.url))?;
            let proof = key.proof(&ProofRequest {
                method: a.method,
                url,
                access_token: a.access_token,
                nonce: a.nonce,
                ..Default::default()
            })?;
            println!("{proof}");
            Ok(())
        }
    }
}
