//! A WebSocket echo origin: the tests' and `warren-loadtest origin`'s (behind the `ws-echo`
//! feature).

/// Answers a WebSocket upgrade request and echoes every message it then receives as a text
/// message. The caller gives the returned `101` head a body of its own type.
pub fn upgrade(req: &mut hyper::Request<hyper::body::Incoming>) -> hyper::Response<()> {
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warren_relay_proto::ws::{self, Role, WsDecoder};

    let key = req.headers().get("sec-websocket-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let mut io = hyper_util::rt::TokioIo::new(up);
        let (mut dec, mut input, mut data) = (WsDecoder::new(Role::Server), BytesMut::new(), BytesMut::new());
        loop {
            while let Ok(Some(_)) = dec.decode(&mut input, &mut data) {}
            if !data.is_empty() {
                let mut out = BytesMut::new();
                ws::encode_frame(&mut out, ws::opcode::TEXT, &data.split(), None);
                if io.write_all(&out).await.is_err() {
                    return;
                }
            }
            input.reserve(4096);
            if !matches!(io.read_buf(&mut input).await, Ok(n) if n > 0) {
                return;
            }
        }
    });
    let mut r = hyper::Response::new(());
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", hyper::header::HeaderValue::from_static("websocket"));
    h.insert("connection", hyper::header::HeaderValue::from_static("Upgrade"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(&ws::accept_key(&key)) {
        h.insert("sec-websocket-accept", v);
    }
    r
}
