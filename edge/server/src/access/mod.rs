//! Who may reach a funnel: the node's rule for each HTTP service and the edge's own floors,
//! enforced before a request enters the tunnel.
//!
//! ```text
//! visitor request ─▶ edge deny list (access.deny)                      403 edge_deny
//!                 ─▶ the node's rule for (port, longest mount covering the path)
//!                      refused rule (bad hash, unknown forward-auth)  403 rule_refused
//!                      deny / allow lists, visitor's socket address   403 ip_denied / ip_not_allowed
//!                      service rate                                   429 rate (Retry-After)
//!                      basic or bearer credentials                    401 no_credentials / bad_credentials
//!                      forward-auth answer (2xx passes)               its answer / 503 forward_auth_unavailable
//!                      access.require_auth and no auth in the rule    403 auth_required
//!                 ─▶ allowed: the head says which rule was enforced (RequestHead::checked)
//! ```
//!
//! The visitor's address is the one its TCP connection came from (for a request a sibling
//! edge forwarded, the one that sibling saw); `X-Forwarded-For` is never read here. A node
//! sends a rule for every HTTP service ([`warren_tunnel_proto::Message::Access`]), so the rule
//! found here is the one of the service the node will pick; the node refuses a protected
//! service's request whose head names another rule or an older generation, which closes the
//! gap between a new service and its rule arriving.

mod credentials;
mod forward;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use warren_common::cidr::Cidr;
use warren_common::limits::TokenBucket;
use warren_tunnel_proto::{AccessRule, Checked, Header, RequestHead, MAX_RULES};

pub(crate) use self::credentials::Passwords;
use self::credentials::{presented, Presented};
pub(crate) use self::forward::ForwardAuth;
use crate::config::AccessConfig;
use crate::pages::Body;

/// The header that names the user an edge authenticated (basic auth); a visitor's own value
/// is always removed.
pub(crate) const USER_HEADER: &str = "x-warren-user";
/// Most entries in one list of a rule.
const MAX_ENTRIES: usize = 256;
/// Highest bcrypt cost accepted in a rule: each check of a wrong password costs the edge
/// 2^cost rounds.
const MAX_BCRYPT_COST: u32 = 14;

/// Why a request was refused: the label of `edge_access_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    EdgeDeny,
    RuleRefused,
    IpDenied,
    IpNotAllowed,
    Rate,
    NoCredentials,
    BadCredentials,
    AuthBusy,
    ForwardDenied,
    ForwardUnavailable,
    AuthRequired,
}

impl Reason {
    pub(crate) const ALL: [Reason; 11] = [
        Reason::EdgeDeny,
        Reason::RuleRefused,
        Reason::IpDenied,
        Reason::IpNotAllowed,
        Reason::Rate,
        Reason::NoCredentials,
        Reason::BadCredentials,
        Reason::AuthBusy,
        Reason::ForwardDenied,
        Reason::ForwardUnavailable,
        Reason::AuthRequired,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::EdgeDeny => "edge_deny",
            Reason::RuleRefused => "rule_refused",
            Reason::IpDenied => "ip_denied",
            Reason::IpNotAllowed => "ip_not_allowed",
            Reason::Rate => "rate",
            Reason::NoCredentials => "no_credentials",
            Reason::BadCredentials => "bad_credentials",
            Reason::AuthBusy => "auth_busy",
            Reason::ForwardDenied => "forward_auth_denied",
            Reason::ForwardUnavailable => "forward_auth_unavailable",
            Reason::AuthRequired => "auth_required",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Reason::EdgeDeny | Reason::IpDenied | Reason::IpNotAllowed => {
                "Your network is not allowed to reach this funnel."
            }
            Reason::RuleRefused => "This funnel's access rule is invalid, so it is closed.",
            Reason::Rate => "Too many requests for this service; try again shortly.",
            Reason::NoCredentials | Reason::BadCredentials => "This funnel needs credentials.",
            Reason::AuthBusy => "Too many sign-ins at once; try again shortly.",
            Reason::ForwardDenied => "Refused by this funnel's authentication service.",
            Reason::ForwardUnavailable => "This funnel's authentication service is unavailable.",
            Reason::AuthRequired => "This edge serves only funnels that require authentication.",
        }
    }
}

/// A refused request: what the visitor gets.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) reason: Reason,
    pub(crate) status: StatusCode,
    /// Headers of the answer (WWW-Authenticate, Retry-After, a forward-auth answer's own).
    pub(crate) headers: Vec<(http::HeaderName, HeaderValue)>,
    /// A forward-auth answer's body; otherwise the page says the reason.
    pub(crate) body: Option<Bytes>,
}

impl Refusal {
    fn new(reason: Reason) -> Self {
        let status = match reason {
            Reason::Rate => StatusCode::TOO_MANY_REQUESTS,
            Reason::NoCredentials | Reason::BadCredentials => StatusCode::UNAUTHORIZED,
            Reason::AuthBusy | Reason::ForwardUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        };
        Refusal { reason, status, headers: Vec::new(), body: None }
    }

    fn retry_after(mut self, wait: Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.headers.push((header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
        self
    }

    /// The visitor's answer.
    pub(crate) fn page(self) -> Response<Body> {
        let mut resp = match self.body {
            Some(body) => {
                let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
                *r.status_mut() = self.status;
                r
            }
            None => crate::pages::page(self.status, self.reason.message()),
        };
        for (n, v) in self.headers {
            resp.headers_mut().append(n, v);
        }
        resp
    }

    /// The answer as a tunnel response head and body (for a sibling edge's visitor).
    pub(crate) fn into_parts(self) -> (u16, Vec<Header>, Bytes) {
        let mut headers: Vec<Header> =
            self.headers.iter().map(|(n, v)| (n.as_str().into(), v.as_bytes().into())).collect();
        let body = match self.body {
            Some(b) => b,
            None => {
                headers.push(("content-type".into(), b"text/plain; charset=utf-8".to_vec()));
                Bytes::from(format!("{}\n", self.reason.message()))
            }
        };
        (self.status.as_u16(), headers, body)
    }
}

/// One service's rule, checked.
#[derive(Debug)]
struct Rule {
    port: u16,
    mount: String,
    /// Why the node's rule was refused: the service is then closed.
    refused: Option<String>,
    basic: Vec<(String, String)>,
    bearer: Vec<[u8; 32]>,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    rate: Option<Mutex<TokenBucket>>,
    forward: Option<Arc<ForwardAuth>>,
}

impl Rule {
    fn has_auth(&self) -> bool {
        !self.basic.is_empty() || !self.bearer.is_empty() || self.forward.is_some()
    }

    fn closed(port: u16, mount: String, why: String) -> Rule {
        let (basic, bearer, allow, deny) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        Rule { port, mount, refused: Some(why), basic, bearer, allow, deny, rate: None, forward: None }
    }
}

/// A node's rules, as one tunnel holds them.
#[derive(Debug, Default)]
pub(crate) struct AccessTable {
    /// The node's generation; 0 until its first Access arrives.
    generation: u32,
    rules: Vec<Rule>,
}

impl AccessTable {
    /// The rule of the service that serves `path` on `port`: the longest mount covering it.
    fn rule_for(&self, port: u16, path: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .filter(|r| r.port == port && warren_tunnel_proto::mount_covers(&r.mount, path))
            .max_by_key(|r| r.mount.len())
    }
}

/// What a request was allowed with: the mark for its head and the headers to add.
#[derive(Debug, Default)]
pub(crate) struct Granted {
    checked: Checked,
    add: Vec<Header>,
    /// Headers removed from the visitor's request first (their values would be trusted).
    strip: Vec<http::HeaderName>,
}

impl Granted {
    /// Marks `head` with the rule enforced (for nodes that read it) and adds the
    /// authenticated user and forward-auth headers, removing any the visitor sent.
    pub(crate) fn apply(self, head: &mut RequestHead, node_version: u16) {
        head.headers.retain(|(n, _)| {
            !n.eq_ignore_ascii_case(USER_HEADER) && !self.strip.iter().any(|s| n.eq_ignore_ascii_case(s.as_str()))
        });
        head.headers.extend(self.add);
        if node_version >= 3 {
            head.checked = Some(self.checked);
        }
    }
}

/// The edge's access state: floors, forward-auth endpoints, the password checker.
#[derive(Debug)]
pub(crate) struct EdgeAccess {
    require_auth: bool,
    deny: Vec<Cidr>,
    forward: Vec<Arc<ForwardAuth>>,
    passwords: Passwords,
    /// `edge_access_refused_total{reason}`, in [`Reason::ALL`] order ...
    refused: [metrics::Counter; Reason::ALL.len()],
    /// ... and the same counts for this edge alone (the recorder is process-wide).
    counts: [AtomicU64; Reason::ALL.len()],
}

impl EdgeAccess {
    /// # Errors
    /// A forward-auth endpoint's CA file is unusable.
    pub(crate) fn new(cfg: &AccessConfig) -> Result<Self, warren_common::tls::TlsError> {
        let forward =
            cfg.forward_auth.iter().map(|c| ForwardAuth::new(c.clone()).map(Arc::new)).collect::<Result<_, _>>()?;
        let refused = Reason::ALL.map(|r| metrics::counter!("edge_access_refused_total", "reason" => r.label()));
        Ok(EdgeAccess {
            require_auth: cfg.require_auth,
            deny: cfg.deny.clone(),
            forward,
            passwords: Passwords::new(),
            refused,
            counts: Default::default(),
        })
    }

    /// Checks a node's rules; a rule that cannot be enforced closes its service and is
    /// reported (`"<port><path>: <why>"`).
    pub(crate) fn table(&self, generation: u32, rules: Vec<AccessRule>) -> (AccessTable, Vec<String>) {
        let now = Instant::now();
        let mut refused = Vec::new();
        let mut out = Vec::new();
        for r in rules.into_iter().take(MAX_RULES) {
            let (port, mount) = (r.port, r.path.clone());
            match self.rule(r, now) {
                Ok(rule) => out.push(rule),
                Err(why) => {
                    refused.push(format!("{port}{mount}: {why}"));
                    out.push(Rule::closed(port, mount, why));
                }
            }
        }
        if self.require_auth {
            for r in out.iter().filter(|r| r.refused.is_none() && !r.has_auth()) {
                refused.push(format!("{}{}: this edge requires authentication on every service", r.port, r.mount));
            }
        }
        (AccessTable { generation, rules: out }, refused)
    }

    fn rule(&self, r: AccessRule, now: Instant) -> Result<Rule, String> {
        if !r.path.starts_with('/') {
            return Err("the mount must start with /".into());
        }
        let lists = [r.basic.len(), r.bearer.len(), r.allow.len(), r.deny.len()];
        if lists.iter().any(|n| *n > MAX_ENTRIES) {
            return Err(format!("a list holds more than {MAX_ENTRIES} entries"));
        }
        for (user, hash) in &r.basic {
            credentials::check_hash(user, hash, MAX_BCRYPT_COST)?;
        }
        let bearer = r
            .bearer
            .iter()
            .map(|b| <[u8; 32]>::try_from(b.as_slice()).map_err(|_| "a bearer token hash is not 32 bytes".to_owned()))
            .collect::<Result<_, _>>()?;
        let nets = |v: &[String]| -> Result<Vec<Cidr>, String> {
            v.iter().map(|s| s.parse().map_err(|e: warren_common::cidr::CidrError| e.to_string())).collect()
        };
        let forward = match r.forward_auth.as_str() {
            "" => None,
            name => match self.forward.iter().find(|f| f.name() == name) {
                Some(f) => Some(f.clone()),
                None => return Err(format!("this edge has no forward_auth named {name:?}")),
            },
        };
        if forward.is_some() && !(r.basic.is_empty() && r.bearer.is_empty()) {
            return Err("forward-auth decides alone: no basic or bearer credentials beside it".into());
        }
        let rate = match (r.rate, r.burst) {
            (0, _) => None,
            (rate, burst) => Some(Mutex::new(TokenBucket::new(f64::from(rate), f64::from(burst.max(1)), now))),
        };
        Ok(Rule {
            port: r.port,
            mount: r.path,
            refused: None,
            basic: r.basic,
            bearer,
            allow: nets(&r.allow)?,
            deny: nets(&r.deny)?,
            rate,
            forward,
        })
    }

    /// Whether the edge's own deny list refuses `visitor` (checked for every request, before
    /// the node is looked up).
    ///
    /// # Errors
    /// The refusal.
    pub(crate) fn floor(&self, visitor: IpAddr) -> Result<(), Refusal> {
        if Cidr::any_contains(&self.deny, visitor) {
            return Err(self.counted(Refusal::new(Reason::EdgeDeny)));
        }
        Ok(())
    }

    /// Decides on a request under `table`, the rules of the node that serves it.
    ///
    /// # Errors
    /// The refusal, counted.
    pub(crate) async fn check(
        &self,
        table: &AccessTable,
        head: &RequestHead,
        visitor: IpAddr,
        host: &str,
    ) -> Result<Granted, Refusal> {
        self.decide(table, head, visitor, host).await.map_err(|r| self.counted(r))
    }

    fn counted(&self, r: Refusal) -> Refusal {
        self.refused[r.reason as usize].increment(1);
        self.counts[r.reason as usize].fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Requests refused for the reason labelled `label` so far.
    pub(crate) fn refused_count(&self, label: &str) -> u64 {
        Reason::ALL.iter().position(|r| r.label() == label).map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    async fn decide(
        &self,
        table: &AccessTable,
        head: &RequestHead,
        ip: IpAddr,
        host: &str,
    ) -> Result<Granted, Refusal> {
        if Cidr::any_contains(&self.deny, ip) {
            return Err(Refusal::new(Reason::EdgeDeny));
        }
        let checked = Checked { generation: table.generation, mount: String::new() };
        let mut granted = Granted { checked, ..Default::default() };
        let Some(rule) = table.rule_for(head.port, &head.uri) else {
            // Before the node's first rules, a floor requiring auth lets nothing through; after
            // them, a path no rule covers has no service (the node answers 404).
            if self.require_auth && table.generation == 0 {
                return Err(Refusal::new(Reason::AuthRequired));
            }
            return Ok(granted);
        };
        granted.checked.mount = rule.mount.clone();
        if rule.refused.is_some() {
            return Err(Refusal::new(Reason::RuleRefused));
        }
        if Cidr::any_contains(&rule.deny, ip) {
            return Err(Refusal::new(Reason::IpDenied));
        }
        if !rule.allow.is_empty() && !Cidr::any_contains(&rule.allow, ip) {
            return Err(Refusal::new(Reason::IpNotAllowed));
        }
        if let Some(bucket) = &rule.rate {
            let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
            if !bucket.try_take(Instant::now(), 1.0) {
                let wait = bucket.time_until(Instant::now(), 1.0);
                return Err(Refusal::new(Reason::Rate).retry_after(wait));
            }
        }
        if let Some(fa) = &rule.forward {
            let (add, strip) = fa.decide(head, ip, host).await?;
            granted.add = add;
            granted.strip = strip;
            return Ok(granted);
        }
        if !rule.basic.is_empty() || !rule.bearer.is_empty() {
            granted.add = self.credentials(rule, head, host).await?;
            return Ok(granted);
        }
        if self.require_auth {
            return Err(Refusal::new(Reason::AuthRequired));
        }
        Ok(granted)
    }

    /// Checks the request's Authorization against the rule's users and tokens.
    async fn credentials(&self, rule: &Rule, head: &RequestHead, host: &str) -> Result<Vec<Header>, Refusal> {
        let challenge = |reason| {
            let mut r = Refusal::new(reason);
            let realm = host.replace(['"', '\\'], "");
            if !rule.basic.is_empty() {
                let v = format!("Basic realm=\"{realm}\", charset=\"UTF-8\"");
                r.headers.extend(HeaderValue::from_str(&v).ok().map(|v| (header::WWW_AUTHENTICATE, v)));
            }
            if !rule.bearer.is_empty() {
                let v = format!("Bearer realm=\"{realm}\"");
                r.headers.extend(HeaderValue::from_str(&v).ok().map(|v| (header::WWW_AUTHENTICATE, v)));
            }
            r
        };
        match presented(&head.headers) {
            Presented::None => Err(challenge(Reason::NoCredentials)),
            Presented::Malformed => Err(challenge(Reason::BadCredentials)),
            Presented::Bearer(token) => match credentials::bearer_matches(&rule.bearer, &token) {
                true => Ok(Vec::new()),
                false => Err(challenge(Reason::BadCredentials)),
            },
            Presented::Basic { user, password } => {
                let Some((_, hash)) = rule.basic.iter().find(|(u, _)| *u == user) else {
                    return Err(challenge(Reason::BadCredentials));
                };
                match self.passwords.verify(&user, &password, hash).await {
                    Ok(true) => Ok(vec![(USER_HEADER.into(), user.into_bytes())]),
                    Ok(false) => Err(challenge(Reason::BadCredentials)),
                    Err(credentials::Busy) => Err(Refusal::new(Reason::AuthBusy).retry_after(Duration::from_secs(1))),
                }
            }
        }
    }
}

/// Whether `headers` carry credentials [`presented`] can read (for the fuzz target).
pub(crate) fn fuzzing_presented(headers: &[Header]) -> bool {
    !matches!(presented(headers), Presented::None | Presented::Malformed)
}

#[cfg(test)]
mod tests;
