//! Access decisions, without sockets: a node's rules, the edge's floors, a request, a verdict.

use base64::Engine as _;

use super::credentials::token_digest;
use super::*;

fn edge(require_auth: bool, deny: &[&str]) -> EdgeAccess {
    let cfg = AccessConfig {
        require_auth,
        deny: deny.iter().map(|d| d.parse().expect("a network")).collect(),
        forward_auth: Vec::new(),
    };
    EdgeAccess::new(&cfg).expect("no CA files")
}

fn request(port: u16, uri: &str, headers: &[(&str, &str)]) -> RequestHead {
    RequestHead {
        method: "GET".into(),
        uri: uri.into(),
        port,
        headers: headers.iter().map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec())).collect(),
        ..RequestHead::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

fn open(port: u16, path: &str) -> AccessRule {
    AccessRule { port, path: path.into(), ..AccessRule::default() }
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

async fn verdict(a: &EdgeAccess, t: &AccessTable, head: &RequestHead, from: &str) -> Result<Granted, Refusal> {
    a.check(t, head, ip(from), "web.funnel.test").await
}

fn reason(r: Result<Granted, Refusal>) -> Reason {
    r.expect_err("refused").reason
}

#[tokio::test]
async fn the_longest_covering_mount_decides_and_is_named_in_the_head() {
    let a = edge(false, &[]);
    let mut admin = open(443, "/admin");
    admin.allow = vec!["10.0.0.0/8".into()];
    let (t, refused) = a.table(4, vec![open(443, "/"), admin]);
    assert!(refused.is_empty(), "{refused:?}");
    let ok = verdict(&a, &t, &request(443, "/admin/users?x=1", &[]), "10.1.1.1").await.expect("allowed");
    assert_eq!(ok.checked, Checked { generation: 4, mount: "/admin".into() });
    assert_eq!(reason(verdict(&a, &t, &request(443, "/admin", &[]), "192.0.2.1").await), Reason::IpNotAllowed);
    let root = verdict(&a, &t, &request(443, "/adminx", &[]), "192.0.2.1").await.expect("the open root");
    assert_eq!(root.checked.mount, "/");
    let other_port = verdict(&a, &t, &request(8443, "/admin", &[]), "192.0.2.1").await.expect("no rule there");
    assert_eq!(other_port.checked.mount, "", "no rule covers port 8443");
}

#[tokio::test]
async fn basic_auth_challenges_refuses_and_names_the_user() {
    let a = edge(false, &[]);
    let mut rule = open(443, "/");
    rule.basic = vec![("alice".into(), bcrypt::hash("s3cret", 4).expect("hashes"))];
    let (t, _) = a.table(1, vec![rule]);
    let none = verdict(&a, &t, &request(443, "/", &[]), "192.0.2.1").await.expect_err("no credentials");
    assert_eq!((none.reason, none.status), (Reason::NoCredentials, StatusCode::UNAUTHORIZED));
    let challenge = none.headers.iter().find(|(n, _)| n == header::WWW_AUTHENTICATE).expect("a challenge");
    assert_eq!(challenge.1, "Basic realm=\"web.funnel.test\", charset=\"UTF-8\"");
    for bad in [basic("alice", "wrong"), basic("bob", "s3cret"), "Basic ###".into(), "Bearer s3cret".into()] {
        let r = verdict(&a, &t, &request(443, "/", &[("authorization", &bad)]), "192.0.2.1").await;
        assert_eq!(reason(r), Reason::BadCredentials, "{bad}");
    }
    let good = basic("alice", "s3cret");
    let spoofed = [("authorization", good.as_str()), (USER_HEADER, "root")];
    let granted = verdict(&a, &t, &request(443, "/", &spoofed), "192.0.2.1").await.expect("allowed");
    let mut head = request(443, "/", &spoofed);
    granted.apply(&mut head, 3);
    let users: Vec<_> = head.headers.iter().filter(|(n, _)| n == USER_HEADER).map(|(_, v)| v.as_slice()).collect();
    assert_eq!(users, [b"alice"], "the visitor's own user header is replaced");
    assert_eq!(head.checked.map(|c| c.mount), Some("/".into()));
}

#[tokio::test]
async fn bearer_tokens_are_matched_by_digest() {
    let a = edge(false, &[]);
    let mut rule = open(443, "/api");
    rule.bearer = vec![token_digest("tok-1").to_vec()];
    let (t, _) = a.table(1, vec![rule]);
    assert!(verdict(&a, &t, &request(443, "/api", &[("authorization", "Bearer tok-1")]), "::1").await.is_ok());
    let wrong = verdict(&a, &t, &request(443, "/api", &[("authorization", "Bearer tok-2")]), "::1").await;
    let wrong = wrong.expect_err("refused");
    assert_eq!(wrong.reason, Reason::BadCredentials);
    assert!(wrong.headers.iter().any(|(n, v)| n == header::WWW_AUTHENTICATE && v.as_bytes().starts_with(b"Bearer")));
}

#[tokio::test]
async fn networks_match_the_socket_address_and_mapped_ipv4() {
    let a = edge(false, &["203.0.113.0/24"]);
    let mut rule = open(443, "/");
    rule.deny = vec!["192.0.2.0/24".into()];
    rule.allow = vec!["192.0.0.0/16".into(), "2001:db8::/32".into()];
    let (t, _) = a.table(1, vec![rule]);
    let head = request(443, "/", &[("x-forwarded-for", "192.168.1.1")]);
    assert_eq!(reason(verdict(&a, &t, &head, "192.0.2.9").await), Reason::IpDenied);
    assert_eq!(reason(verdict(&a, &t, &head, "::ffff:192.0.2.9").await), Reason::IpDenied, "mapped IPv4");
    assert!(verdict(&a, &t, &head, "::ffff:192.0.3.9").await.is_ok());
    assert!(verdict(&a, &t, &head, "2001:db8::7").await.is_ok());
    assert_eq!(
        reason(verdict(&a, &t, &head, "198.51.100.1").await),
        Reason::IpNotAllowed,
        "X-Forwarded-For is not read"
    );
    assert_eq!(reason(verdict(&a, &t, &head, "203.0.113.5").await), Reason::EdgeDeny);
    assert_eq!(a.floor(ip("::ffff:203.0.113.5")).expect_err("the edge's list").reason, Reason::EdgeDeny);
}

#[tokio::test]
async fn a_service_over_its_rate_is_told_when_to_come_back() {
    let a = edge(false, &[]);
    let mut rule = open(443, "/");
    (rule.rate, rule.burst) = (1, 2);
    let (t, _) = a.table(1, vec![rule]);
    let head = request(443, "/", &[]);
    assert!(verdict(&a, &t, &head, "::1").await.is_ok());
    assert!(verdict(&a, &t, &head, "::1").await.is_ok());
    let over = verdict(&a, &t, &head, "::1").await.expect_err("over the burst");
    assert_eq!((over.reason, over.status), (Reason::Rate, StatusCode::TOO_MANY_REQUESTS));
    assert!(over.headers.iter().any(|(n, v)| n == header::RETRY_AFTER && v == "1"));
}

#[tokio::test]
async fn rules_that_cannot_be_enforced_close_their_service() {
    let a = edge(false, &[]);
    let mut bad_hash = open(443, "/a");
    bad_hash.basic = vec![("alice".into(), "plain-password".into())];
    let mut costly = open(443, "/b");
    // A cost-4 hash relabelled: making a real cost-15 one takes seconds.
    let relabelled = bcrypt::hash("x", 4).expect("hashes").replacen("$04$", &format!("${}$", MAX_BCRYPT_COST + 1), 1);
    costly.basic = vec![("alice".into(), relabelled)];
    let mut unknown = open(443, "/c");
    unknown.forward_auth = "sso".into();
    let mut short = open(443, "/d");
    short.bearer = vec![vec![1, 2, 3]];
    let mut bad_net = open(443, "/e");
    bad_net.allow = vec!["10.0.0.1/8".into()];
    let (t, refused) = a.table(1, vec![bad_hash, costly, unknown, short, bad_net, open(443, "/")]);
    assert_eq!(refused.len(), 5, "{refused:?}");
    assert!(refused[2].starts_with("443/c: ") && refused[2].contains("sso"), "{refused:?}");
    for path in ["/a", "/b/x", "/c", "/d", "/e"] {
        assert_eq!(reason(verdict(&a, &t, &request(443, path, &[]), "::1").await), Reason::RuleRefused, "{path}");
    }
    assert!(verdict(&a, &t, &request(443, "/f", &[]), "::1").await.is_ok(), "the sound rule still holds");
}

#[tokio::test]
async fn an_edge_that_requires_auth_closes_open_services() {
    let a = edge(true, &[]);
    let head = request(443, "/", &[]);
    let before = AccessTable::default();
    assert_eq!(reason(verdict(&a, &before, &head, "::1").await), Reason::AuthRequired, "nothing before the rules");
    let mut locked = open(443, "/private");
    locked.bearer = vec![token_digest("t").to_vec()];
    let (t, refused) = a.table(1, vec![open(443, "/"), locked]);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(reason(verdict(&a, &t, &head, "::1").await), Reason::AuthRequired);
    assert_eq!(reason(verdict(&a, &t, &request(443, "/private", &[]), "::1").await), Reason::NoCredentials);
    let (t, _) = a.table(2, vec![]);
    assert!(verdict(&a, &t, &head, "::1").await.is_ok(), "a path no service holds goes on to the node's 404");
}

#[test]
fn refusals_become_pages_and_tunnel_answers() {
    let page = Refusal::new(Reason::Rate).retry_after(Duration::from_millis(1500)).page();
    assert_eq!(page.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(page.headers()[header::RETRY_AFTER], "2");
    let (status, headers, body) = Refusal::new(Reason::IpDenied).into_parts();
    assert_eq!(status, 403);
    assert!(headers.iter().any(|(n, _)| n == "content-type"));
    assert!(!body.is_empty());
}
