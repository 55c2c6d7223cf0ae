//! One HTTP/1.1 request on a connection of its own, for the servers' callouts (the relay's
//! admission check, the edge's forward-auth).

/// Sends `req` over `io` and returns the response head; the body streams from the
/// connection task, which ends with this one request.
///
/// # Errors
/// The handshake or the request failed.
pub async fn request<I, B>(
    io: I,
    req: hyper::Request<B>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    sender.send_request(req).await
}
