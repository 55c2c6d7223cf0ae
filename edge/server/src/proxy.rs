//! The public side: a visitor's request becomes one QUIC stream to the node that holds the host.
//!
//! ```text
//! visitor --TLS--> edge: Host <name>.<funnel domain> -> tunnel of <name>
//!   open a bidirectional stream; write RequestHead; stream the request body; finish
//!   read ResponseHead; answer the visitor; stream the response body as it arrives
//!   101 Switching Protocols: bridge the upgraded visitor connection and the stream
//! ```
//! Bodies are never buffered whole. Every wait on the node has a deadline, so a visitor gets a
//! clear error page rather than a hang.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use warren_tunnel::{is_hop_by_hop, read_message, send_body, te_is_trailers, write_message, FramedBody, StreamBody};
use warren_tunnel_proto::{Message, RequestHead, END_STREAM};

use crate::cluster::ForwardError;
use crate::metrics::Limited;
use crate::routes::{name_in, Body, Denied, Opened, RouteError};
use crate::state::Shared;

/// What the edge knows about a visitor's connection.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    pub(crate) visitor: SocketAddr,
    pub(crate) port: u16,
    pub(crate) sni: String,
    pub(crate) tls_version: String,
}

/// Serves one visitor request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let resp = match proxy(&shared, &info, req).await {
        Ok(r) => r,
        Err(e) => {
            match &e {
                Denied::Route(RouteError::RateLimited) => shared.metrics.limited(Limited::HostRate),
                Denied::Route(e) => debug!(visitor = %info.visitor, error = ?e, "request not proxied"),
                Denied::Access(r) => debug!(visitor = %info.visitor, reason = r.reason.label(), "request refused"),
            }
            e.page()
        }
    };
    shared.metrics.request(resp.status().as_u16());
    shared.metrics.duration.record(start.elapsed().as_secs_f64());
    Ok(resp)
}

fn host_of(req: &Request<Incoming>) -> Option<String> {
    let raw = req.uri().authority().map(|a| a.host().to_owned()).or_else(|| {
        let h = req.headers().get(header::HOST)?.to_str().ok()?;
        // Strip a port (IPv6 literals are never funnel names, so a plain rsplit is enough).
        Some(h.rsplit_once(':').map_or(h, |(host, _)| host).to_owned())
    })?;
    Some(raw.trim_end_matches('.').to_ascii_lowercase())
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The head sent to the node (see [`take_trailers`] for the framed response).
fn request_head(req: &Request<Incoming>, info: &ConnInfo, host: &str, upgrade: bool) -> RequestHead {
    let mut headers: Vec<(String, Vec<u8>)> = Vec::with_capacity(req.headers().len() + 6);
    let mut xff = None;
    for (n, v) in req.headers() {
        let name = n.as_str();
        if is_hop_by_hop(name, upgrade) || name.eq_ignore_ascii_case("forwarded") || name.starts_with("x-forwarded-") {
            if name == "x-forwarded-for" {
                xff = Some(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            continue;
        }
        headers.push((name.to_owned(), v.as_bytes().to_vec()));
    }
    if !req.headers().contains_key(header::HOST) {
        headers.push(("host".into(), host.as_bytes().to_vec()));
    }
    let ip = info.visitor.ip().to_string();
    let chain = match xff {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.clone(),
    };
    let for_ip = if info.visitor.is_ipv6() { format!("\"[{ip}]\"") } else { ip };
    headers.push(("x-forwarded-for".into(), chain.into_bytes()));
    headers.push(("x-forwarded-proto".into(), b"https".to_vec()));
    headers.push(("x-forwarded-host".into(), host.as_bytes().to_vec()));
    headers.push(("forwarded".into(), format!("for={for_ip};proto=https;host={host}").into_bytes()));
    RequestHead {
        method: req.method().as_str().to_owned(),
        uri: req.uri().path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        headers,
        visitor: info.visitor.to_string(),
        port: info.port,
        sni: info.sni.clone(),
        tls_version: info.tls_version.clone(),
        upgrade,
        trailers: false,
        checked: None,
    }
}

/// The visitor takes trailers and the node frames its response body (protocol version 2), so
/// `te: trailers` goes on to the origin.
fn take_trailers(head: &mut RequestHead) {
    head.trailers = true;
    head.headers.insert(0, ("te".into(), b"trailers".to_vec()));
}

/// Whether the visitor said it takes trailers (`te: trailers`, as gRPC clients do).
fn takes_trailers(req: &Request<Incoming>) -> bool {
    req.headers().get_all(header::TE).iter().any(|v| te_is_trailers(v.as_bytes()))
}

async fn proxy(shared: &Arc<Shared>, info: &ConnInfo, mut req: Request<Incoming>) -> Result<Response<Body>, Denied> {
    shared.access.floor(info.visitor.ip()).map_err(Denied::Access)?;
    let host = host_of(&req).ok_or(RouteError::UnknownHost)?;
    let name: std::borrow::Cow<'_, str> = match name_in(&host, &shared.config.funnel_domain) {
        Some(n) => n.into(),
        None => shared.domains.name_for(&host).ok_or(RouteError::UnknownHost)?.into(),
    };
    let name = name.as_ref();
    let upgrade = is_upgrade(&req);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let mut head = request_head(&req, info, &host, upgrade);
    // Trailers need a framed response, which nodes speak from version 2; requests forwarded
    // to a sibling edge go without (the node behind it may be older).
    let visitor = info.visitor.ip();
    let (permit, mut send, mut recv, framed) =
        match shared.routes.open(&shared.access, name, &mut head, visitor, &host).await {
            Ok(Opened { permit, send, recv, version }) => {
                (Some(permit), send, recv, version >= 2 && takes_trailers(&req))
            }
            // Another edge of the cluster may hold the tunnel; it applies the node's limits and
            // access rules.
            Err(Denied::Route(RouteError::Offline)) => match &shared.cluster {
                Some(cluster) => match cluster.open(&shared.endpoint, name).await {
                    Ok((send, recv)) => (None, send, recv, false),
                    Err(ForwardError::NoRoute) => return Err(RouteError::Offline.into()),
                    Err(ForwardError::Unreachable) => return Err(RouteError::NodeUnreachable.into()),
                },
                None => return Err(RouteError::Offline.into()),
            },
            Err(e) => return Err(e),
        };
    if framed {
        take_trailers(&mut head);
    }
    write_message(&mut send, &Message::Request(head)).await.map_err(|_| RouteError::NodeUnreachable)?;
    let body = req.into_body();
    // Once the response has been streamed out in full (or the visitor left), the request is
    // over: an upload the origin never read is abandoned, which resets the visitor's HTTP/2
    // stream instead of leaving it blocked on flow control.
    let response_done = CancellationToken::new();
    let send = if upgrade {
        Some(send)
    } else {
        let done = response_done.clone();
        shared.tasks.spawn(async move {
            tokio::select! {
                r = send_body(body, &mut send) => if let Err(e) = r {
                    debug!(error = %e, "request body not fully sent");
                },
                _ = done.cancelled() => {
                    send.reset();
                    debug!("response complete before the request body: upload abandoned");
                }
            }
        });
        None
    };
    let answer = tokio::time::timeout(shared.config.response_timeout, read_message(&mut recv))
        .await
        .map_err(|_| RouteError::NodeTimeout)?
        .map_err(|_| RouteError::BadNodeResponse)?;
    let Message::Response(head) = answer else {
        return Err(RouteError::BadNodeResponse.into());
    };
    let status = StatusCode::from_u16(head.status).map_err(|_| RouteError::BadNodeResponse)?;
    let switching = status == StatusCode::SWITCHING_PROTOCOLS && upgrade;
    let mut resp = Response::new(Empty::new().map_err(|never: Infallible| match never {}).boxed());
    *resp.status_mut() = status;
    let empty = framed && head.headers.iter().any(|(n, _)| n == END_STREAM);
    for (n, v) in &head.headers {
        if is_hop_by_hop(n, switching) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_bytes(v)) {
            resp.headers_mut().append(n, v);
        }
    }
    let stall = shared.config.stalled_reader;
    match (switching, on_upgrade, send) {
        (true, Some(on_upgrade), Some(send)) => {
            shared.tasks.spawn(async move {
                let _permit = permit;
                let Ok(upgraded) = on_upgrade.await else { return };
                let mut visitor = TokioIo::new(upgraded);
                let mut node = tokio::io::join(recv, send);
                let _ = tokio::io::copy_bidirectional(&mut visitor, &mut node).await;
            });
        }
        // A known-empty body stays Empty, so the visitor's HTTP/2 stream ends with the headers.
        _ if empty => drop((permit, response_done)),
        _ if framed => {
            *resp.body_mut() = FramedBody::with_guard(recv, (permit, response_done.drop_guard()), stall).boxed()
        }
        _ => *resp.body_mut() = StreamBody::with_guard(recv, (permit, response_done.drop_guard()), stall).boxed(),
    }
    Ok(resp)
}
