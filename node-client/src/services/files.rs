//! A static file target: files under one directory (or one file), as a small web server
//! would serve them.
//!
//! ```text
//! GET|HEAD path ─▶ percent-decode ─▶ refuse NUL, '\', '..' segments (400)
//!   ─▶ root.join(path).canonicalize() must stay under the root (symlinks included), else 404
//!   directory: no trailing '/' -> 301 to "<last segment>/"; index.html, else a listing
//!   file: Content-Type by extension, Last-Modified, ETag, If-None-Match -> 304,
//!         one `Range: bytes=` range -> 206 (unsatisfiable -> 416), else the whole file
//! ```
//! Bodies are read in 64 KiB chunks as the visitor takes them; nothing is loaded whole.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Frame;
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};

use super::origin::Body;
use super::ServiceError;

/// Bytes read from a file per body frame.
const CHUNK: usize = 64 << 10;
/// Most entries shown in a directory listing.
const MAX_LISTING: usize = 1000;

/// Files served from `root`.
#[derive(Debug, Clone)]
pub struct Files {
    root: PathBuf,
    /// The target is one file, served at the mount itself.
    single: bool,
}

impl Files {
    /// Opens `path`: it must exist and be readable by this process.
    ///
    /// # Errors
    /// [`ServiceError::Open`] saying what is missing or unreadable.
    pub fn open(path: &Path) -> Result<Files, ServiceError> {
        let open = |what: &str, e: io::Error| ServiceError::Open(format!("{what} {}: {e}", path.display()));
        let root = std::fs::canonicalize(path).map_err(|e| open("cannot open", e))?;
        let meta = std::fs::metadata(&root).map_err(|e| open("cannot read", e))?;
        if meta.is_dir() {
            std::fs::read_dir(&root).map_err(|e| open("cannot list", e))?;
        } else {
            std::fs::File::open(&root).map_err(|e| open("cannot read", e))?;
        }
        Ok(Files { root, single: !meta.is_dir() })
    }

    /// Answers one request. `rest` is the path (and query) under the mount; `public_path` the
    /// path the visitor asked for, used to redirect `dir` to `dir/`.
    pub async fn serve(&self, method: &Method, rest: &str, public_path: &str, headers: &HeaderMap) -> Response<Body> {
        if method != Method::GET && method != Method::HEAD {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "Only GET and HEAD are served here.\n");
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let path = rest.split_once('?').map_or(rest, |(p, _)| p);
        let Some(relative) = decode_path(path) else {
            return text(StatusCode::BAD_REQUEST, "Bad path.\n");
        };
        if self.single {
            return match relative.as_os_str().is_empty() {
                true => self.file(&self.root, method, headers).await,
                false => not_found(),
            };
        }
        let full = match tokio::fs::canonicalize(self.root.join(&relative)).await {
            Ok(p) if p.starts_with(&self.root) => p,
            Ok(_) => return not_found(),
            Err(e) => return io_error(&e),
        };
        let meta = match tokio::fs::metadata(&full).await {
            Ok(m) => m,
            Err(e) => return io_error(&e),
        };
        if !meta.is_dir() {
            return self.file(&full, method, headers).await;
        }
        let public = public_path.split_once('?').map_or(public_path, |(p, _)| p);
        if !public.ends_with('/') {
            let last = public.rsplit('/').next().unwrap_or_default();
            let mut r = text(StatusCode::MOVED_PERMANENTLY, "Moved.\n");
            if let Ok(v) = HeaderValue::from_str(&format!("{last}/")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        let index = full.join("index.html");
        if tokio::fs::metadata(&index).await.is_ok_and(|m| m.is_file()) {
            return self.file(&index, method, headers).await;
        }
        listing(&full, public).await
    }

    async fn file(&self, path: &Path, method: &Method, headers: &HeaderMap) -> Response<Body> {
        let mut file = match tokio::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) => return io_error(&e),
        };
        let meta = match file.metadata().await {
            Ok(m) if m.is_file() => m,
            Ok(_) => return not_found(),
            Err(e) => return io_error(&e),
        };
        let len = meta.len();
        let modified = meta.modified().ok();
        let etag = etag(len, modified);
        let mut r = Response::new(empty());
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path)));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if let Ok(v) = HeaderValue::from_str(&etag) {
            h.insert(header::ETAG, v);
        }
        if let Some(v) = modified.and_then(|m| HeaderValue::from_str(&http_date(m)).ok()) {
            h.insert(header::LAST_MODIFIED, v);
        }
        if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| etag_matches(v, &etag)) {
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            return r;
        }
        let (start, end) = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(|v| parse_range(v, len)) {
            None | Some(Range::Ignored) => (0, len),
            Some(Range::Satisfiable(a, b)) => {
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{}/{len}", b - 1)) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                (a, b)
            }
            Some(Range::Unsatisfiable) => {
                let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "Range not satisfiable.\n");
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return r;
            }
        };
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
        if method == Method::HEAD || start == end {
            return r;
        }
        if start > 0 && file.seek(io::SeekFrom::Start(start)).await.is_err() {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "Cannot read the file.\n");
        }
        *r.body_mut() = FileBody { file, left: end - start, buf: BytesMut::new() }.boxed();
        r
    }
}

/// A visitor's path, percent-decoded, as a path under the root; `None` if it is malformed
/// (bad escapes, not UTF-8, NUL or `\\`) or climbs out (`..`).
pub fn decode_path(path: &str) -> Option<PathBuf> {
    let raw = path.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).ok()?;
    if decoded.contains(['\0', '\\']) {
        return None;
    }
    let mut rel = PathBuf::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => return None,
            s => rel.push(s),
        }
    }
    Some(rel)
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Range {
    /// Not one byte range we serve (several ranges, other units): send the whole file.
    Ignored,
    /// Bytes `start..end`.
    Satisfiable(u64, u64),
    /// Starts past the end.
    Unsatisfiable,
}

/// Reads a `Range` header for a file of `len` bytes: one `bytes=` range is served, anything
/// else is the whole file.
pub fn parse_range(v: &str, len: u64) -> Range {
    let Some(spec) = v.trim().strip_prefix("bytes=") else { return Range::Ignored };
    if spec.contains(',') {
        return Range::Ignored;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return Range::Ignored };
    let (a, b) = (a.trim(), b.trim());
    match (a.parse::<u64>(), b.parse::<u64>()) {
        // bytes=-N: the last N bytes.
        (Err(_), Ok(n)) if a.is_empty() => match n {
            0 => Range::Unsatisfiable,
            _ if len == 0 => Range::Unsatisfiable,
            n => Range::Satisfiable(len.saturating_sub(n), len),
        },
        (Ok(start), _) if start >= len => Range::Unsatisfiable,
        (Ok(start), Err(_)) if b.is_empty() => Range::Satisfiable(start, len),
        (Ok(start), Ok(last)) if last >= start => Range::Satisfiable(start, (last + 1).min(len)),
        _ => Range::Ignored,
    }
}

fn etag(len: u64, modified: Option<SystemTime>) -> String {
    let t = modified.and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok()).unwrap_or_default();
    format!("W/\"{len:x}-{:x}-{:x}\"", t.as_secs(), t.subsec_nanos())
}

fn etag_matches(header: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    header.split(',').any(|t| t.trim() == "*" || bare(t) == bare(etag))
}

/// An IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(month - 1) as usize];
    format!("{weekday}, {day:02} {name} {year} {:02}:{:02}:{:02} GMT", rem / 3600, rem / 60 % 60, rem % 60)
}

/// The content type for a file name, by extension.
fn content_type(path: &Path) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" | "md" | "log" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        _ => "application/octet-stream",
    }
}

async fn listing(dir: &Path, public: &str) -> Response<Body> {
    let mut entries = Vec::new();
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return text(StatusCode::FORBIDDEN, "This directory cannot be listed.\n");
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        if entries.len() == MAX_LISTING {
            break;
        }
        let is_dir = e.file_type().await.is_ok_and(|t| t.is_dir());
        entries.push((e.file_name().to_string_lossy().into_owned(), is_dir));
    }
    entries.sort();
    let title = escape(public);
    let mut html = format!("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n<body><h1>{title}</h1>\n<ul>\n");
    for (name, is_dir) in entries {
        let slash = if is_dir { "/" } else { "" };
        let _ = writeln!(
            html,
            "<li><a href=\"{}{slash}\">{}{slash}</a></li>",
            escape(&percent_encode(&name)),
            escape(&name)
        );
    }
    html.push_str("</ul>\n</body></html>\n");
    let mut r = Response::new(Full::new(Bytes::from(html)).map_err(|never| match never {}).boxed());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A short plain-text answer.
pub(crate) fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg.to_owned())).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "Not found.\n")
}

fn io_error(e: &io::Error) -> Response<Body> {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => not_found(),
        io::ErrorKind::PermissionDenied => text(StatusCode::FORBIDDEN, "Forbidden.\n"),
        _ => text(StatusCode::INTERNAL_SERVER_ERROR, "Cannot read the file.\n"),
    }
}

/// `left` bytes of an open file, in chunks.
struct FileBody {
    file: tokio::fs::File,
    left: u64,
    buf: BytesMut,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let want = CHUNK.min(usize::try_from(this.left).unwrap_or(CHUNK));
        this.buf.resize(want, 0);
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"))));
                }
                this.left -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(this.buf.split_to(n).freeze()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_decode_and_never_climb() {
        assert_eq!(decode_path("/a/b%20c.txt"), Some(PathBuf::from("a/b c.txt")));
        assert_eq!(decode_path("/"), Some(PathBuf::new()));
        assert_eq!(decode_path("//a/./b/"), Some(PathBuf::from("a/b")));
        for bad in ["/../etc/passwd", "/a/%2e%2e/%2e%2e/x", "/a%00b", "/a%5c..%5cb", "/%zz", "/%", "/%ff%fe"] {
            assert_eq!(decode_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Range::Satisfiable(0, 10));
        assert_eq!(parse_range("bytes=90-", 100), Range::Satisfiable(90, 100));
        assert_eq!(parse_range("bytes=-10", 100), Range::Satisfiable(90, 100));
        assert_eq!(parse_range("bytes=-1000", 100), Range::Satisfiable(0, 100));
        assert_eq!(parse_range("bytes=50-1000", 100), Range::Satisfiable(50, 100));
        assert_eq!(parse_range("bytes=100-", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Range::Ignored);
        assert_eq!(parse_range("items=0-1", 100), Range::Ignored);
        assert_eq!(parse_range("bytes=9-1", 100), Range::Ignored);
        assert_eq!(parse_range("bytes=x", 100), Range::Ignored);
    }

    #[test]
    fn dates_types_and_tags() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(SystemTime::UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(content_type(Path::new("a/INDEX.HTML")), "text/html; charset=utf-8");
        assert_eq!(content_type(Path::new("noext")), "application/octet-stream");
        let tag = etag(10, Some(t));
        assert!(etag_matches(&tag, &tag) && etag_matches("\"x\", *", &tag) && !etag_matches("\"x\"", &tag));
    }
}
