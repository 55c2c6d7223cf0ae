//! The admin listener: `/metrics` (Prometheus text), `/healthz` and `/readyz`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::state::Shared;

pub(crate) fn serve(
    prometheus: Option<PrometheusHandle>,
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body, ctype) = match req.uri().path() {
        "/metrics" => match &prometheus {
            Some(p) => (StatusCode::OK, p.render(), "text/plain; version=0.0.4"),
            None => (StatusCode::NOT_FOUND, "metrics recorder not installed\n".to_owned(), "text/plain"),
        },
        "/healthz" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/readyz" if shared.is_draining() => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned(), "text/plain"),
        "/readyz" => (StatusCode::OK, "ready\n".to_owned(), "text/plain"),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned(), "text/plain"),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(resp)
}
