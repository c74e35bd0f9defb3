//! Shared access signatures signed with an account key (HMAC-SHA256, service version
//! 2018-11-09). The current SDK takes no shared key, so requests carry an account SAS instead.

use anyhow::Context;
use azure_core::{credentials::Secret, hmac::hmac_sha256};
use chrono::{DateTime, TimeDelta, Utc};

const VERSION: &str = "2018-11-09";

pub struct AccountKey {
    account: String,
    key: Secret,
}

impl AccountKey {
    pub fn new(account: &str, key_base64: &str) -> anyhow::Result<AccountKey> {
        let key = Secret::new(key_base64.to_string());
        // Fail at startup, not at the first export, on a key that is not base64.
        hmac_sha256("probe", &key).context("the storage account key is not valid base64")?;
        Ok(AccountKey {
            account: account.to_string(),
            key,
        })
    }

    /// An account SAS for the blob service (read, add, create, write, delete, list on service,
    /// containers and blobs), valid for an hour from a little before `now`.
    pub fn account_sas(&self, now: DateTime<Utc>) -> anyhow::Result<String> {
        let (start, expiry) = (
            time(now - TimeDelta::minutes(5)),
            time(now + TimeDelta::hours(1)),
        );
        let (permissions, services, resource_types, protocols) =
            ("racwdl", "b", "sco", "https,http");
        let to_sign = format!(
            "{}\n{permissions}\n{services}\n{resource_types}\n{start}\n{expiry}\n\n{protocols}\n{VERSION}\n",
            self.account
        );
        let signature = hmac_sha256(&to_sign, &self.key)?;
        Ok(query(&[
            ("sv", VERSION),
            ("ss", services),
            ("srt", resource_types),
            ("sp", permissions),
            ("st", &start),
            ("se", &expiry),
            ("spr", protocols),
            ("sig", &signature),
        ]))
    }

    /// A read-only service SAS for one blob, valid until `expires`.
    pub fn blob_read_sas(
        &self,
        container: &str,
        blob: &str,
        now: DateTime<Utc>,
        expires: DateTime<Utc>,
    ) -> anyhow::Result<String> {
        let (start, expiry) = (time(now - TimeDelta::minutes(5)), time(expires));
        let resource = format!("/blob/{}/{container}/{blob}", self.account);
        // permissions, start, expiry, resource, identifier, IP, protocol, version, resource
        // type, snapshot time, then five response-header overrides.
        let to_sign =
            format!("r\n{start}\n{expiry}\n{resource}\n\n\nhttps,http\n{VERSION}\nb\n\n\n\n\n\n");
        let signature = hmac_sha256(&to_sign, &self.key)?;
        Ok(query(&[
            ("sv", VERSION),
            ("sr", "b"),
            ("sp", "r"),
            ("st", &start),
            ("se", &expiry),
            ("spr", "https,http"),
            ("sig", &signature),
        ]))
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn query(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_with_the_key_and_encodes_the_signature() {
        let key = AccountKey::new("acct", "a2V5a2V5a2V5").unwrap();
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let sas = key.account_sas(now).unwrap();
        assert!(sas.starts_with("sv=2018-11-09&ss=b&srt=sco&sp=racwdl&st=2025-12-31T23%3A55%3A00Z&se=2026-01-01T01%3A00%3A00Z"), "{sas}");
        let expected = hmac_sha256(
            "acct\nracwdl\nb\nsco\n2025-12-31T23:55:00Z\n2026-01-01T01:00:00Z\n\nhttps,http\n2018-11-09\n",
            &Secret::new("a2V5a2V5a2V5".to_string()),
        )
        .unwrap();
        assert!(sas.ends_with(&format!(
            "sig={}",
            form_urlencoded::byte_serialize(expected.as_bytes()).collect::<String>()
        )));
        assert!(AccountKey::new("acct", "not base64!").is_err());
    }
}
