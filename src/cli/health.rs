//! `fhir-export health`: the container health check, without curl in the image. Asks the
//! server's `/health` and exits non-zero unless it answers 200.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};

use crate::config::Config;

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// The server's base URL; default: `server.listen` (an unspecified address asked on
    /// loopback).
    #[arg(long)]
    pub url: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 2)]
    pub timeout_secs: u64,
}

pub async fn run(config: &Config, args: &HealthArgs) -> anyhow::Result<()> {
    let base = match &args.url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => format!("http://{}", local_address(config.server.listen)),
    };
    let url = format!("{base}/health");
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_secs))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url} did not answer"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status != reqwest::StatusCode::OK {
        bail!("{url} answered {status}: {}", body.trim());
    }
    println!("{}", body.trim());
    Ok(())
}

/// Where a client on this host reaches `listen`: a wildcard address is asked on loopback.
fn local_address(listen: SocketAddr) -> SocketAddr {
    let mut address = listen;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    address
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_asked_on_loopback() {
        let ask = |listen: &str| local_address(listen.parse().unwrap()).to_string();
        assert_eq!(ask("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(ask("[::]:9000"), "[::1]:9000");
        assert_eq!(ask("10.1.2.3:8080"), "10.1.2.3:8080");
    }
}
