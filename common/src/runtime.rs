//! Process plumbing shared by the binaries: logging setup and shutdown signals.

/// Logs to stderr with `RUST_LOG` (or `default_level`), as text or JSON, with colours only on
/// a terminal.
pub fn init_logging(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return std::future::pending().await };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The admin listener every server runs: `/metrics` (Prometheus text), `/healthz` (200 while
/// the process serves) and `/readyz` (503 once `ready` says no, e.g. while draining).
///
/// Stops accepting when `cancel` fires and closes the connections it serves at the same time;
/// every connection task runs on `tracker`. The exporter's upkeep runs every 5 s meanwhile.
#[cfg(feature = "admin")]
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ready: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
    cancel: tokio_util::sync::CancellationToken,
    tracker: tokio_util::task::TaskTracker,
) {
    use std::time::Duration;

    if let Some(p) = prometheus.clone() {
        // Histograms need periodic upkeep when the exporter's own HTTP listener is not used.
        let cancel = cancel.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => p.run_upkeep(),
                }
            }
        });
    }
    loop {
        let tcp = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (prometheus, ready, cancel) = (prometheus.clone(), ready.clone(), cancel.clone());
        tracker.spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                std::future::ready(Ok::<_, std::convert::Infallible>(admin_answer(
                    req.uri().path(),
                    prometheus.as_ref(),
                    ready(),
                )))
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

/// The admin listener's answer for `path`.
#[cfg(feature = "admin")]
fn admin_answer(
    path: &str,
    prometheus: Option<&metrics_exporter_prometheus::PrometheusHandle>,
    ready: bool,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::StatusCode;

    let (status, body, ctype) = match path {
        "/metrics" => match prometheus {
            Some(p) => (StatusCode::OK, p.render(), "text/plain; version=0.0.4"),
            None => (StatusCode::NOT_FOUND, "metrics recorder not installed\n".to_owned(), "text/plain"),
        },
        "/healthz" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/readyz" if !ready => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned(), "text/plain"),
        "/readyz" => (StatusCode::OK, "ready\n".to_owned(), "text/plain"),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned(), "text/plain"),
    };
    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    resp
}

#[cfg(all(test, feature = "admin"))]
mod tests {
    use super::*;

    #[test]
    fn admin_paths() {
        assert_eq!(admin_answer("/healthz", None, false).status(), 200);
        assert_eq!(admin_answer("/readyz", None, true).status(), 200);
        assert_eq!(admin_answer("/readyz", None, false).status(), 503);
        assert_eq!(admin_answer("/metrics", None, true).status(), 404);
        assert_eq!(admin_answer("/other", None, true).status(), 404);
        let ctype = admin_answer("/healthz", None, true).headers()["content-type"].clone();
        assert_eq!(ctype, "text/plain");
    }
}
