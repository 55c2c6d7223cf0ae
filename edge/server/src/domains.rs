//! Custom domains: a node asks to be reached at `app.example.com` too; the edge serves it only
//! once the domain's DNS proves the node may have it, orders its certificate, and keeps checking.
//!
//! ```text
//! node -> edge   Domains { names }
//! proof          TXT  _warren.<domain>  "warren-verify=<32 hex: SHA-256 of domain and node name>"
//!            or  CNAME <domain> -> <name>.<funnel domain>
//! edge -> node   DomainsSet { served, pending: "<domain>: <the record to publish>" }
//! every recheck  pending domains proven since are served (certificate ordered, once per
//!                cluster through the issuance lock); served ones whose proof is gone stop
//! ```
//!
//! The proof binds a domain to a node name, so a record made for another node proves nothing.
//! DNS is asked over UDP at `[domains] resolver` ([`crate::dns`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::valid_name;
use crate::dns::{self, RecordType};
use crate::state::Shared;

/// Most custom domains one node may ask for.
pub(crate) const MAX_PER_NODE: usize = 16;
/// Longest wait for one DNS answer.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// The TXT value that proves `domain` may be served for node `name`.
pub fn proof_value(domain: &str, name: &str) -> String {
    let d =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, format!("warren-domain\0{domain}\0{name}").as_bytes());
    let hex: String = d.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("warren-verify={hex}")
}

/// Whether `d` is a domain a node may ask for: lower-case labels, at least two, and not a name
/// under the funnel domain (those are the nodes' own).
pub(crate) fn acceptable(d: &str, funnel_domain: &str) -> bool {
    d.len() <= 253
        && d.split('.').count() >= 2
        && d.split('.').all(valid_name)
        && d != funnel_domain
        && !d.ends_with(&format!(".{funnel_domain}"))
}

/// Whether `domain`'s DNS proves it is `name`'s; `Err` says what to publish.
async fn proven(resolver: SocketAddr, domain: &str, name: &str, funnel_domain: &str) -> Result<(), String> {
    let value = proof_value(domain, name);
    let txt = dns::lookup(resolver, &format!("_warren.{domain}"), RecordType::Txt, DNS_TIMEOUT).await;
    if txt.as_ref().is_ok_and(|records| records.iter().any(|r| r.trim() == value)) {
        return Ok(());
    }
    let target = format!("{name}.{funnel_domain}");
    let cname = dns::lookup(resolver, domain, RecordType::Cname, DNS_TIMEOUT).await;
    if cname.as_ref().is_ok_and(|records| records.contains(&target)) {
        return Ok(());
    }
    let lookup_failed = txt.err().or(cname.err()).map(|e| format!(" ({e})")).unwrap_or_default();
    Err(format!("publish TXT _warren.{domain} \"{value}\" or CNAME {domain} -> {target}{lookup_failed}"))
}

/// Takes a node's wish and answers with what is served and what is missing.
pub(crate) async fn wish(
    shared: &Arc<Shared>,
    tunnel: u64,
    name: &str,
    names: Vec<String>,
) -> (Vec<String>, Vec<String>) {
    let fd = &shared.config.funnel_domain;
    let (mut served, mut pending) = (Vec::new(), Vec::new());
    let mut wanted = Vec::new();
    for d in names.into_iter().map(|d| d.trim_end_matches('.').to_ascii_lowercase()) {
        if !acceptable(&d, fd) {
            pending.push(format!("{d}: not a domain this edge serves for nodes"));
        } else if wanted.len() >= MAX_PER_NODE {
            pending.push(format!("{d}: at most {MAX_PER_NODE} domains per node"));
        } else if !wanted.contains(&d) {
            wanted.push(d);
        }
    }
    shared.domains.set_wish(tunnel, name, &wanted);
    let resolver = shared.config.domains.resolver.or_else(dns::system_resolver);
    let Some(resolver) = resolver.filter(|_| shared.config.domains.enabled && shared.acme.is_some()) else {
        pending.extend(
            wanted.iter().map(|d| format!("{d}: this edge takes no custom domains (it needs ACME and a resolver)")),
        );
        return (served, pending);
    };
    for d in wanted {
        match proven(resolver, &d, name, fd).await {
            Ok(()) => {
                serve(shared, tunnel, &d);
                served.push(d);
            }
            Err(missing) => pending.push(format!("{d}: {missing}")),
        }
    }
    (served, pending)
}

/// Serves a proven domain and orders its certificate.
fn serve(shared: &Arc<Shared>, tunnel: u64, domain: &str) {
    shared.domains.set_served(tunnel, domain, true);
    info!(%domain, "custom domain proven; served");
    if let Some(acme) = shared.acme.clone() {
        let domain = domain.to_owned();
        shared.background.spawn(async move { acme.ensure(&domain).await });
    }
}

/// Re-checks every domain every `recheck`: newly proven ones are served, ones whose proof is
/// gone stop being served.
pub(crate) async fn recheck_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let Some(resolver) = shared.config.domains.resolver.or_else(dns::system_resolver) else { return };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(shared.config.domains.recheck) => {}
        }
        for e in shared.domains.snapshot() {
            let ok = proven(resolver, &e.domain, &e.name, &shared.config.funnel_domain).await.is_ok();
            match (ok, e.served) {
                (true, false) => serve(&shared, e.tunnel, &e.domain),
                (false, true) => {
                    shared.domains.set_served(e.tunnel, &e.domain, false);
                    warn!(domain = %e.domain, name = %e.name, "custom domain's proof is gone; no longer served");
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_a_domain_to_one_node() {
        let v = proof_value("app.example.com", "web");
        assert!(v.starts_with("warren-verify=") && v.len() == "warren-verify=".len() + 32, "{v}");
        assert_ne!(v, proof_value("app.example.com", "other"), "another node's record proves nothing");
        assert_ne!(v, proof_value("www.example.com", "web"));
    }

    #[test]
    fn nodes_ask_only_for_real_domains_outside_the_funnel_domain() {
        assert!(acceptable("app.example.com", "funnel.test"));
        for bad in ["localhost", "web.funnel.test", "funnel.test", "a..b", "Bad_Domain.com", "x.-y.com"] {
            assert!(!acceptable(bad, "funnel.test"), "{bad}");
        }
    }
}
