//! The admin listener: `/metrics`, `/healthz`, `/readyz` (503 while draining).

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

pub(crate) async fn serve(
    listener: TcpListener,
    prometheus: Option<PrometheusHandle>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((t, _)) => t,
                Err(_) => continue,
            },
        };
        let (prometheus, shared) = (prometheus.clone(), shared.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/metrics" => match &prometheus {
                        Some(p) => {
                            p.run_upkeep();
                            (StatusCode::OK, p.render())
                        }
                        None => (StatusCode::NOT_FOUND, "no metrics recorder\n".into()),
                    },
                    "/healthz" => (StatusCode::OK, "ok\n".into()),
                    "/readyz" if shared.is_draining() => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
                    "/readyz" => (StatusCode::OK, "ready\n".into()),
                    _ => (StatusCode::NOT_FOUND, "not found\n".into()),
                };
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = status;
                std::future::ready(Ok::<_, std::convert::Infallible>(r))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}
