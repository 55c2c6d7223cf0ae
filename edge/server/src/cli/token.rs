//! `warren-edge token`: signed node tokens, for operators.
//!
//! ```text
//! warren-edge token keygen --key-file signing.key     prints the public key for [credentials]
//! warren-edge token issue --key-file signing.key --names web,docs --expires 30d
//! warren-edge --config edge.toml token revoke <id>    every edge closes its tunnels within
//!                                                     [credentials] revocation_check
//! warren-edge --config edge.toml token list [--json]
//! ```
//!
//! With `--config`, issued tokens are recorded in the edges' store (Redis for a cluster, the
//! state directory for one edge), and `issue` refuses a lifetime over `max_lifetime`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use warren_common::config::parse_duration;
use warren_edge::config::{valid_name, Config};
use warren_edge::credentials::{self, Claims};
use warren_edge::store::{FileStore, RedisStore, Store};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a signing key (PKCS#8, mode 0600; never overwritten) and print its public key.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Issue a token for node names and print it (recorded in the store with --config).
    Issue {
        /// The signing key.
        #[arg(long)]
        key_file: PathBuf,
        /// Node names it may register, comma-separated (`*`: any).
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
        /// How long it is valid: 12h, 30d, ...
        #[arg(long, default_value = "30d")]
        expires: String,
    },
    /// Revoke a token by id: the edges refuse it and close its tunnels.
    Revoke {
        /// The token's id (`token list`, or printed by `token issue`).
        id: String,
    },
    /// List the tokens recorded in the store.
    List {
        /// One JSON object per token.
        #[arg(long)]
        json: bool,
    },
}

/// Prints one line of the command's output.
#[allow(clippy::print_stdout)] // stdout is the command's output
fn out(line: &str) {
    println!("{line}");
}

pub(crate) fn run(cmd: TokenCommand, config: &Config, has_config: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    // The Redis store starts its connection task when made.
    let _in_runtime = rt.enter();
    let store = || -> anyhow::Result<Arc<dyn Store>> {
        if !has_config {
            bail!("the edges' store is named by their config: pass --config");
        }
        Ok(match &config.cluster {
            Some(c) => Arc::new(RedisStore::new(&c.redis_url)?),
            None => Arc::new(FileStore::new(&config.state_dir.join("certs"))?),
        })
    };
    match cmd {
        TokenCommand::Keygen { key_file } => {
            let public = credentials::create_key(&key_file)?;
            out(&public);
            eprintln!("add it to the edges: [credentials] public_keys = [\"{public}\"]");
        }
        TokenCommand::Issue { key_file, names, expires } => {
            let lifetime = parse_duration(&expires).with_context(|| format!("--expires {expires:?}: e.g. 12h, 30d"))?;
            if let Some(bad) = names.iter().find(|n| *n != "*" && !valid_name(n)) {
                bail!("{bad:?} is not a node name");
            }
            if let Some(max) = config.credentials.as_ref().map(|c| c.max_lifetime).filter(|_| has_config) {
                if lifetime > max {
                    bail!("--expires {expires}: the edges accept at most {} days", max.as_secs() / 86_400);
                }
            }
            let key = credentials::load_key(&key_file)?;
            let now = credentials::unix_now(SystemTime::now());
            let claims = Claims { id: credentials::new_id(), names, iat: now, exp: now + lifetime.as_secs() };
            if has_config {
                rt.block_on(store()?.record_token(&claims)).context("recording the token in the store")?;
            }
            out(&credentials::sign(&key, &claims));
            eprintln!("token id {} for {}, expires in {expires}", claims.id, claims.names.join(","));
        }
        TokenCommand::Revoke { id } => {
            let store = store()?;
            let max = config.credentials.as_ref().map_or(Duration::from_secs(365 * 86_400), |c| c.max_lifetime);
            let recorded = rt.block_on(store.tokens()).unwrap_or_default().into_iter().find(|c| c.id == id);
            let known = recorded.is_some();
            // Kept as long as the token could still be presented.
            let until = recorded.map_or(SystemTime::now() + max, |c| c.expires());
            rt.block_on(store.revoke(&id, until)).context("writing the revocation")?;
            eprintln!("token {id} revoked{}", if known { "" } else { " (it is not in the record of issued tokens)" });
        }
        TokenCommand::List { json } => {
            let store = store()?;
            let mut tokens = rt.block_on(store.tokens()).context("reading the store")?;
            let revoked = rt.block_on(store.revoked()).context("reading the store")?;
            tokens.sort_by_key(|c| c.iat);
            for c in tokens {
                let is_revoked = revoked.contains(&c.id);
                if json {
                    let v = serde_json::json!({"id": c.id, "names": c.names, "iat": c.iat, "exp": c.exp, "revoked": is_revoked});
                    out(&v.to_string());
                } else {
                    let state = if is_revoked {
                        "revoked"
                    } else if c.expires() < SystemTime::now() {
                        "expired"
                    } else {
                        "valid"
                    };
                    out(&format!("{}  {:<8}  exp {}  {}", c.id, state, c.exp, c.names.join(",")));
                }
            }
        }
    }
    Ok(())
}
