//! Checks every request passes before it is routed, each answered with a 4xx OperationOutcome
//! at once: without auth, a `Host` name this server does not answer to (a web page whose name
//! was rebound to this machine's address, reading an open API), a URL whose
//! decoded text holds a NUL or is not UTF-8 (Postgres text cannot hold a NUL, and a lossy
//! decoding would act on other text than the client sent), and a declared body larger than
//! its route takes (refused from the header: the body is never read, and a client that sent
//! `Expect: 100-continue` is not invited to upload it).

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{ApiError, AppState, auth::TOKEN_BODY_LIMIT};
use crate::auth::config::AuthMode;

pub async fn check(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match admit(&state, &request) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

fn admit(state: &AppState, request: &Request) -> Result<(), ApiError> {
    if state.config.auth.mode == AuthMode::None {
        check_host(request, &state.base_url)?;
    }
    check_uri_text(request.uri())?;
    check_declared_length(state, request)
}

/// Without auth, only this server's own public host, loopback names and IP addresses are
/// served: a web page whose name was rebound to 127.0.0.1 sends its own name as `Host`, and
/// an address is no name that a page could rebind.
fn check_host(request: &Request, base_url: &str) -> Result<(), ApiError> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(host_name);
    let public = url_host(base_url);
    match host {
        Some(host)
            if is_loopback_name(&host)
                || is_address(&host)
                || Some(host.as_str()) == public.as_deref() =>
        {
            Ok(())
        }
        _ => Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "forbidden",
            "without authorization this server answers only to its public host \
             (server.public_url), loopback names and IP addresses; the Host header names another",
        )),
    }
}

/// The lowercased name of a `host[:port]` (IPv6 literals keep their brackets).
fn host_name(host: &str) -> String {
    let name = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    Some(host_name(authority))
}

/// An IPv4 address, or an IPv6 one in brackets.
fn is_address(name: &str) -> bool {
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .is_some_and(|n| n.parse::<std::net::Ipv6Addr>().is_ok())
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name == "[::1]"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The path and query, percent-decoded, must be UTF-8 without NUL.
fn check_uri_text(uri: &axum::http::Uri) -> Result<(), ApiError> {
    let path_ok = clean_text(uri.path().as_bytes());
    let query_ok = uri.query().is_none_or(|q| clean_text(q.as_bytes()));
    if path_ok && query_ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "the URL holds a NUL character or bytes that are not UTF-8 (after percent-decoding)",
        ))
    }
}

fn clean_text(encoded: &[u8]) -> bool {
    let decoded: Vec<u8> = percent_decode(encoded);
    !decoded.contains(&0) && std::str::from_utf8(&decoded).is_ok()
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// A `Content-Length` beyond what the route reads is a 413 before any byte of the body.
fn check_declared_length(state: &AppState, request: &Request) -> Result<(), ApiError> {
    let Some(length) = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return Ok(());
    };
    let (limit, setting) = body_limit(state, request.uri().path());
    if length <= limit as u64 {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-costly",
        format!(
            "this request's body may have at most {limit} bytes ({setting}); it declares {length}"
        ),
    ))
}

/// The most body a route reads, and the setting that says so.
fn body_limit(state: &AppState, path: &str) -> (usize, &'static str) {
    let server = &state.config.server;
    if path.ends_with("/$export") || path.ends_with("%24export") {
        (server.max_kickoff_bytes, "server.max_kickoff_bytes")
    } else if path == "/auth/token" {
        (TOKEN_BODY_LIMIT, "the token endpoint's limit")
    } else {
        (server.max_body_bytes, "server.max_body_bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_compared_without_ports() {
        assert_eq!(host_name("LocalHost:8080"), "localhost");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("example.org."), "example.org");
        assert_eq!(
            url_host("https://u@Fhir.example.org:8443/base").as_deref(),
            Some("fhir.example.org")
        );
        assert!(is_loopback_name("127.0.0.7"));
        assert!(is_loopback_name("app.localhost"));
        assert!(!is_loopback_name("127.0.0.1.evil.example"));
        assert!(!is_loopback_name("rebound.example"));
        assert!(
            is_address("10.1.2.3") && is_address("[fe80::1]") && !is_address("10.1.2.3.nip.io")
        );
    }

    #[test]
    fn urls_with_nul_or_broken_utf8_are_refused() {
        let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
        assert!(check_uri_text(&uri("/Group/a%00b/$export")).is_err());
        assert!(check_uri_text(&uri("/$export?_type=Pat%00ient")).is_err());
        assert!(check_uri_text(&uri("/$export?_type=%FF%FE")).is_err());
        assert!(check_uri_text(&uri("/$export?_type=Patient&_since=2020")).is_ok());
        assert!(check_uri_text(&uri("/Patient/%C3%A9")).is_ok());
    }
}
