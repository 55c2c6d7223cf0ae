//! `warren funnel`: publish, list and withdraw services on the running node, the way
//! `tailscale funnel` does.
//!
//! ```text
//! warren funnel 3000                      foreground: published until Ctrl-C
//! warren funnel --bg --set-path /api 4000 saved in services.json, restored by `warren up`
//! warren funnel status [--json]           URL -> target tree, edges, request counts
//! warren funnel off 443/api               withdraw one (`--https-port`/`--set-path` name it too)
//! warren funnel reset                     withdraw every added service
//! warren funnel log [--json]              follow the node's request log
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use warren::control::Connection;
use warren::funnel::url_port;
use warren::services::{AccessSpec, HostHeader, ServiceKind, ServiceSpec, DEFAULT_PORT};

use crate::{report, ControlArgs};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct FunnelArgs {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    add: AddArgs,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, clap::Args)]
struct AddArgs {
    /// What to publish: a port (3000), host:port, http://, https://, https+insecure://,
    /// h2c://, unix:/path.sock, a directory or file (/srv/site, ./public), or text:Hello.
    target: Option<String>,
    /// Public HTTPS port on the edge: 443, 8443 or 10000.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    https_port: u16,
    /// Mount the service at this path (longest mount wins); the mount is stripped.
    #[arg(long, default_value = "/")]
    set_path: String,
    /// Forward the full path, mount included.
    #[arg(long)]
    keep_path: bool,
    /// Host header for the origin: keep (the public name), origin (the target's), or a name.
    #[arg(long, default_value = "keep")]
    host_header: String,
    /// PEM file of a CA to trust for an https:// target.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A name for the service (default `<port><path>`, `tcp:<port>`, `tls:<port>`).
    #[arg(long)]
    name: Option<String>,
    /// A raw TCP service on this edge port (one the edge's operator offers for TCP); the
    /// target is a port or host:port.
    #[arg(long, conflicts_with_all = ["tls_passthrough", "set_path"])]
    tcp: Option<u16>,
    /// Pass TLS for this node's name on this public port through the edge unopened: TLS ends
    /// on the node (--cert-file/--key-file) or at the target.
    #[arg(long, conflicts_with = "set_path")]
    tls_passthrough: Option<u16>,
    /// The node's certificate chain (PEM) for --tls-passthrough.
    #[arg(long, requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// The key (PEM) of --cert-file.
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// Start each TCP connection to the target with a PROXY protocol v2 header.
    #[arg(long)]
    proxy_protocol: bool,
    /// Who may reach it, checked by the edge (repeatable): `basic:USER:BCRYPT-HASH` (make
    /// one with `warren hash-password`), `bearer:TOKEN` or `bearer:sha256:HEX`, or
    /// `forward:NAME` (a forward-auth endpoint the edge's operator configured).
    #[arg(long = "auth", value_name = "METHOD")]
    auth: Vec<String>,
    /// Let in only visitors from this network (CIDR; repeatable).
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    /// Keep visitors from this network out (CIDR; repeatable).
    #[arg(long, value_name = "CIDR")]
    deny: Vec<String>,
    /// Requests per second the edge lets through to this service.
    #[arg(long)]
    rate: Option<u32>,
    /// Requests at once above --rate [default: one second's worth].
    #[arg(long, requires = "rate")]
    burst: Option<u32>,
    /// Keep it: saved with the node and published again after a restart; returns at once.
    #[arg(long)]
    bg: bool,
}

/// The access rule the flags ask for, if any.
fn access_of(a: &AddArgs) -> anyhow::Result<Option<AccessSpec>> {
    let mut spec = AccessSpec {
        allow: a.allow.clone(),
        deny: a.deny.clone(),
        rate: a.rate,
        burst: a.burst,
        ..AccessSpec::default()
    };
    for method in &a.auth {
        match method.split_once(':') {
            Some(("basic", pair)) => spec.basic.push(pair.to_owned()),
            Some(("bearer", token)) => spec.bearer.push(token.to_owned()),
            Some(("forward", name)) => spec.forward_auth = Some(name.to_owned()),
            _ => bail!("--auth {method:?}: use basic:USER:HASH, bearer:TOKEN or forward:NAME"),
        }
    }
    spec.digest_tokens();
    Ok((!spec.is_open()).then_some(spec))
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Show what is published: URL -> target, edge links, request counts.
    Status {
        /// Print the node's JSON instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Withdraw one service, by name (`443/api`) or by --https-port and --set-path.
    Off {
        /// The service's name, as `warren funnel status` shows it.
        id: Option<String>,
        /// Public port of the service.
        #[arg(long, default_value_t = DEFAULT_PORT)]
        https_port: u16,
        /// Mount path of the service.
        #[arg(long, default_value = "/")]
        set_path: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Withdraw every service added with `warren funnel` (those in node.toml stay).
    Reset {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Follow the node's request log.
    Log {
        /// One JSON object per request.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
}

pub(crate) async fn run(args: FunnelArgs) -> anyhow::Result<()> {
    match args.action {
        Some(Action::Status { json, control }) => status(&control, json).await,
        Some(Action::Off { id, https_port, set_path, control }) => {
            let id = match id {
                Some(id) => id,
                None => ServiceSpec::new(https_port, "")
                    .at(&set_path)
                    .normalized()
                    .map_or_else(|_| format!("{https_port}{set_path}"), |s| s.id()),
            };
            call(&control, json!({"cmd": "funnel_off", "id": id})).await?;
            report(&format!("{id} is off"));
            Ok(())
        }
        Some(Action::Reset { control }) => {
            call(&control, json!({"cmd": "funnel_reset"})).await?;
            report("every added service is off");
            Ok(())
        }
        Some(Action::Log { json, control }) => log(&control, json).await,
        None => add(args.add, &args.control).await,
    }
}

async fn connect(control: &ControlArgs) -> anyhow::Result<Connection> {
    Connection::open(&control.control)
        .await
        .with_context(|| format!("cannot reach the node at {} (is `warren up` running?)", control.control.display()))
}

/// One request; fails with the node's error on `"ok": false`.
async fn call(control: &ControlArgs, req: Value) -> anyhow::Result<Value> {
    let answer = connect(control).await?.call(&req).await?;
    check(answer)
}

fn check(answer: Value) -> anyhow::Result<Value> {
    if answer.get("ok") != Some(&Value::Bool(true)) {
        bail!("{}", answer.get("error").and_then(Value::as_str).unwrap_or("request failed"));
    }
    Ok(answer)
}

async fn add(a: AddArgs, control: &ControlArgs) -> anyhow::Result<()> {
    let access = access_of(&a)?;
    let Some(target) = a.target else {
        bail!("what to publish? e.g. `warren funnel 3000` (see `warren funnel --help`)");
    };
    let host_header = match a.host_header.as_str() {
        "keep" => HostHeader::Keep,
        "origin" => HostHeader::Origin,
        other => HostHeader::Fixed(other.to_owned()),
    };
    // A relative directory is the caller's, not the node's working directory.
    let target = match target.strip_prefix("file:").unwrap_or(&target) {
        p if p.starts_with("./") || p.starts_with("../") || p == "." => {
            std::env::current_dir()?.join(p).display().to_string()
        }
        _ => target,
    };
    let here = |p: PathBuf| std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p);
    let (kind, port) = match (a.tcp, a.tls_passthrough) {
        (Some(p), _) => (ServiceKind::Tcp, p),
        (None, Some(p)) => (ServiceKind::Tls, p),
        (None, None) => (ServiceKind::Http, a.https_port),
    };
    let spec = ServiceSpec {
        access,
        name: a.name,
        kind,
        cert_file: a.cert_file.map(here),
        key_file: a.key_file.map(here),
        proxy_protocol: a.proxy_protocol,
        port,
        path: a.set_path,
        target,
        strip_path: !a.keep_path,
        host_header,
        ca_file: a.ca_file.map(here),
    };
    spec.check()?;
    let mut conn = connect(control).await?;
    let answer = check(conn.call(&json!({"cmd": "funnel_add", "service": spec, "background": a.bg})).await?)?;
    let urls: Vec<&str> = answer
        .get("urls")
        .and_then(Value::as_array)
        .map(|u| u.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    report("Available on the internet:\n");
    for u in &urls {
        report(u);
    }
    let (target, _) = spec.check()?;
    match kind {
        ServiceKind::Http => report(&format!("|-- {} -> {target}\n", spec.path)),
        _ => report(&format!("|-- {target}\n")),
    }
    if a.bg {
        report(&format!("Saved with the node. Turn it off with `warren funnel off {}`.", spec.id()));
        return Ok(());
    }
    report("Press Ctrl+C to exit.");
    tokio::select! {
        () = warren_common::runtime::wait_for_signal() => {}
        r = conn.next() => if let Ok(None) | Err(_) = r {
            bail!("the node stopped");
        },
    }
    Ok(())
}

async fn status(control: &ControlArgs, json: bool) -> anyhow::Result<()> {
    let answer = call(control, json!({"cmd": "funnel_status"})).await?;
    let funnel = answer.get("funnel").cloned().unwrap_or(Value::Null);
    if json {
        report(&serde_json::to_string_pretty(&funnel)?);
        return Ok(());
    }
    report(&render_status(&funnel));
    Ok(())
}

/// The human form of `funnel_status`: one tree per public URL, then the edges.
fn render_status(f: &Value) -> String {
    if f.is_null() {
        return "No funnel: start `warren up` with an edge and a token.".into();
    }
    let mut out = String::new();
    let all = f["services"].as_array().cloned().unwrap_or_default();
    let (services, raw): (Vec<Value>, Vec<Value>) = all.into_iter().partition(|s| s["kind"] == "http");
    let urls: Vec<&str> =
        f["urls"].as_array().map(|u| u.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    if services.is_empty() && raw.is_empty() {
        out.push_str("Nothing is published. Try `warren funnel 3000`.\n");
    }
    let mut ports: Vec<u64> = services.iter().filter_map(|s| s["port"].as_u64()).collect();
    ports.dedup();
    for port in ports {
        let url = urls
            .iter()
            .find(|u| u64::from(url_port(u)) == port)
            .map_or_else(|| format!("(port {port}: not registered on an edge yet)"), |u| (*u).to_owned());
        let _ = writeln!(out, "{url}");
        let on_port: Vec<&Value> = services.iter().filter(|s| s["port"].as_u64() == Some(port)).collect();
        let width = on_port.iter().filter_map(|s| s["path"].as_str()).map(str::len).max().unwrap_or(1);
        let mut on_port = on_port;
        on_port.sort_by_key(|s| s["path"].as_str().unwrap_or_default().to_owned());
        for s in on_port {
            let n = s["requests"].as_u64().unwrap_or(0);
            let _ = writeln!(
                out,
                "|-- {:<width$}  -> {}   [{}, {}, {n} request{}]",
                s["path"].as_str().unwrap_or("?"),
                s["target"].as_str().unwrap_or("?"),
                s["id"].as_str().unwrap_or("?"),
                s["origin"].as_str().unwrap_or("?"),
                if n == 1 { "" } else { "s" },
            );
            if let Some(access) = s["access"].as_str() {
                let _ = writeln!(out, "|   {:<width$}     access: {access}", "");
            }
        }
        out.push('\n');
    }
    let raw_urls: Vec<&str> =
        f["raw_urls"].as_array().map(|u| u.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    for s in &raw {
        let kind = s["kind"].as_str().unwrap_or("?");
        let port = s["port"].as_u64().unwrap_or(0);
        let url = raw_urls
            .iter()
            .find(|u| u.starts_with(&format!("{kind}://")) && u64::from(url_port(u)) == port)
            .map_or_else(|| format!("({kind} {port}: not granted by an edge yet)"), |u| (*u).to_owned());
        let n = s["requests"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "{url}\n|-- {}   [{}, {}, {n} connection{}]\n",
            s["target"].as_str().unwrap_or("?"),
            s["id"].as_str().unwrap_or("?"),
            s["origin"].as_str().unwrap_or("?"),
            if n == 1 { "" } else { "s" },
        );
    }
    let mut refused = f["refused"].as_array().cloned().unwrap_or_default();
    // A refused access rule closes its service on that edge.
    let access_refused = f["access_refused"].as_array().cloned().unwrap_or_default();
    refused.extend(access_refused.iter().filter_map(Value::as_str).map(|r| Value::from(format!("access {r}"))));
    if let Some(broken) = f["broken"].as_array().filter(|b| !b.is_empty() || !refused.is_empty()) {
        out.push_str("Not served:\n");
        for b in broken {
            let _ = writeln!(out, "  {}: {}", b["id"].as_str().unwrap_or("?"), b["error"].as_str().unwrap_or("?"));
        }
        for r in refused.iter().filter_map(Value::as_str) {
            let _ = writeln!(out, "  refused by the edge: {r}");
        }
        out.push('\n');
    }
    let served = f["domains"].as_array().cloned().unwrap_or_default();
    let pending = f["domains_pending"].as_array().cloned().unwrap_or_default();
    if !served.is_empty() || !pending.is_empty() {
        out.push_str("Custom domains:\n");
        for d in served.iter().filter_map(Value::as_str) {
            let _ = writeln!(out, "  https://{d}/  served");
        }
        for p in pending.iter().filter_map(Value::as_str) {
            let _ = writeln!(out, "  not served: {p}");
        }
        out.push('\n');
    }
    out.push_str("Edges:\n");
    for e in f["edges"].as_array().cloned().unwrap_or_default() {
        let connected = e["connected"].as_bool() == Some(true);
        let state = if connected { "connected" } else { "not connected" };
        let over = match (e["transport"].as_str().filter(|_| connected), e["proxy"].as_str()) {
            (Some(t), Some(p)) => format!(" over {t} via proxy {p}"),
            (Some(t), None) => format!(" over {t}"),
            (None, _) => String::new(),
        };
        let rtt = e["rtt_ms"].as_f64().map(|r| format!(", rtt {r:.1} ms")).unwrap_or_default();
        let err = e["last_error"].as_str().filter(|_| !connected).map(|r| format!(" ({r})")).unwrap_or_default();
        let _ = writeln!(out, "  {}  {state}{over}{rtt}{err}", e["edge"].as_str().unwrap_or("?"));
    }
    let _ = write!(out, "Requests: {}", f["requests"].as_u64().unwrap_or(0));
    out
}

async fn log(control: &ControlArgs, json: bool) -> anyhow::Result<()> {
    let mut conn = connect(control).await?;
    check(conn.call(&json!({"cmd": "funnel_log"})).await?)?;
    loop {
        let entry = tokio::select! {
            () = warren_common::runtime::wait_for_signal() => return Ok(()),
            e = conn.next() => e?,
        };
        let Some(e) = entry else { bail!("the node stopped") };
        if json {
            report(&e.to_string());
            continue;
        }
        if let Some(n) = e.get("missed").and_then(Value::as_u64) {
            report(&format!("... {n} requests not shown (the log went faster than this terminal)"));
            continue;
        }
        report(&format!(
            "{} {} {} {} {:.1}ms {} [{}]",
            clock(e["time"].as_f64().unwrap_or(0.0)),
            e["status"].as_u64().unwrap_or(0),
            e["method"].as_str().unwrap_or("?"),
            e["path"].as_str().unwrap_or("?"),
            e["duration_ms"].as_f64().unwrap_or(0.0),
            e["visitor"].as_str().unwrap_or("?"),
            e["service"].as_str().unwrap_or("?"),
        ));
    }
}

/// `HH:MM:SS.mmm` UTC of a Unix time.
fn clock(t: f64) -> String {
    let ms = (t * 1000.0) as u64;
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}Z", s / 3600 % 24, s / 60 % 60, s % 60, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_as_a_tree() {
        let f = json!({
            "connected": true,
            "urls": ["https://web.funnel.test/", "https://web.funnel.test:8443/"],
            "services": [
                {"id": "443/", "kind": "http", "port": 443, "path": "/", "target": "files /srv/site", "requests": 2, "origin": "config"},
                {"id": "443/api", "kind": "http", "port": 443, "path": "/api", "target": "http://127.0.0.1:3000", "requests": 5, "origin": "saved"},
                {"id": "8443/", "kind": "http", "port": 8443, "path": "/", "target": "http://127.0.0.1:9000", "requests": 0, "origin": "foreground"},
                {"id": "tcp:20001", "kind": "tcp", "port": 20001, "path": "/", "target": "tcp://127.0.0.1:6379", "requests": 1, "origin": "saved"},
            ],
            "raw_urls": ["tcp://web.funnel.test:20001"],
            "refused": ["tls 8443: not a public port of this edge"],
            "broken": [{"id": "10000/", "error": "cannot open /nope"}],
            "edges": [{"edge": "127.0.0.1:7443", "connected": true, "rtt_ms": 0.42}],
            "requests": 7,
        });
        let text = render_status(&f);
        let expected = "https://web.funnel.test/\n\
            |-- /     -> files /srv/site   [443/, config, 2 requests]\n\
            |-- /api  -> http://127.0.0.1:3000   [443/api, saved, 5 requests]\n\n\
            https://web.funnel.test:8443/\n\
            |-- /  -> http://127.0.0.1:9000   [8443/, foreground, 0 requests]\n\n\
            tcp://web.funnel.test:20001\n|-- tcp://127.0.0.1:6379   [tcp:20001, saved, 1 connection]\n\n\
            Not served:\n  10000/: cannot open /nope\n  refused by the edge: tls 8443: not a public port of this edge\n\n\
            Edges:\n  127.0.0.1:7443  connected, rtt 0.4 ms\nRequests: 7";
        assert_eq!(text, expected);
        assert_eq!(clock(3723.004), "01:02:03.004Z");
        let edges = json!({"edges": [
            {"edge": "a:7443", "connected": true, "transport": "quic", "rtt_ms": 1.0},
            {"edge": "b:7443", "connected": true, "transport": "tcp", "proxy": "http://p:3128", "rtt_ms": 2.5},
            {"edge": "c:7443", "connected": false, "last_error": "QUIC: timed out; TCP: refused"},
        ], "requests": 0});
        assert_eq!(
            render_status(&edges),
            "Nothing is published. Try `warren funnel 3000`.\nEdges:\n  a:7443  connected over quic, rtt 1.0 ms\n  b:7443  connected over tcp via proxy http://p:3128, rtt 2.5 ms\n  \
             c:7443  not connected (QUIC: timed out; TCP: refused)\nRequests: 0"
        );
    }
}
