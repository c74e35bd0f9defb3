//! Shared access signatures (HMAC-SHA256, service version 2018-11-09): account and service SAS
//! signed with an account key (the current SDK takes no shared key, so requests carry an
//! account SAS instead), and user delegation SAS signed with a key obtained through Entra ID.

use anyhow::Context;
use azure_core::{credentials::Secret, hmac::hmac_sha256};
use chrono::{DateTime, TimeDelta, Utc};

const VERSION: &str = "2018-11-09";

pub struct AccountKey {
    account: String,
    key: Secret,
    /// `spr`: https only, except for an endpoint that speaks plain http (the emulator).
    protocols: &'static str,
}

impl AccountKey {
    pub fn new(account: &str, key_base64: &str, https_only: bool) -> anyhow::Result<AccountKey> {
        let key = Secret::new(key_base64.to_string());
        // Fail at startup, not at the first export, on a key that is not base64.
        hmac_sha256("probe", &key).context("the storage account key is not valid base64")?;
        Ok(AccountKey {
            account: account.to_string(),
            key,
            protocols: if https_only { "https" } else { "https,http" },
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
            ("racwdl", "b", "sco", self.protocols);
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
        let protocols = self.protocols;
        let to_sign =
            format!("r\n{start}\n{expiry}\n{resource}\n\n\n{protocols}\n{VERSION}\nb\n\n\n\n\n\n");
        let signature = hmac_sha256(&to_sign, &self.key)?;
        Ok(query(&[
            ("sv", VERSION),
            ("sr", "b"),
            ("sp", "r"),
            ("st", &start),
            ("se", &expiry),
            ("spr", protocols),
            ("sig", &signature),
        ]))
    }
}

/// A user delegation key (from Entra ID), as the service returned it.
pub struct DelegationKey {
    pub object_id: String,
    pub tenant_id: String,
    pub start: String,
    pub expiry: String,
    pub service: String,
    pub version: String,
    /// The key, base64.
    pub value: String,
}

/// A read-only user delegation SAS for one blob, valid until `expires`.
pub fn blob_read_delegation_sas(
    key: &DelegationKey,
    account: &str,
    container: &str,
    blob: &str,
    now: DateTime<Utc>,
    expires: DateTime<Utc>,
) -> anyhow::Result<String> {
    let (start, expiry) = (time(now - TimeDelta::minutes(5)), time(expires));
    let resource = format!("/blob/{account}/{container}/{blob}");
    let k = key;
    // permissions, start, expiry, resource, the key's oid, tid, start, expiry, service,
    // version, IP, protocol, version, resource type, snapshot time, five header overrides.
    let to_sign = format!(
        "r\n{start}\n{expiry}\n{resource}\n{}\n{}\n{}\n{}\n{}\n{}\n\nhttps\n{VERSION}\nb\n\n\n\n\n\n",
        k.object_id, k.tenant_id, k.start, k.expiry, k.service, k.version
    );
    let signature = hmac_sha256(&to_sign, &Secret::new(k.value.clone()))?;
    Ok(query(&[
        ("sv", VERSION),
        ("sr", "b"),
        ("sp", "r"),
        ("st", &start),
        ("se", &expiry),
        ("skoid", &k.object_id),
        ("sktid", &k.tenant_id),
        ("skt", &k.start),
        ("ske", &k.expiry),
        ("sks", &k.service),
        ("skv", &k.version),
        ("spr", "https"),
        ("sig", &signature),
    ]))
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
        let key = AccountKey::new("acct", "a2V5a2V5a2V5", false).unwrap();
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
        assert!(AccountKey::new("acct", "not base64!", true).is_err());
        let https = AccountKey::new("acct", "a2V5a2V5a2V5", true).unwrap();
        assert!(https.account_sas(now).unwrap().contains("spr=https&"));
        let blob = https.blob_read_sas("c", "b", now, now).unwrap();
        assert!(blob.contains("spr=https&"), "{blob}");
    }

    #[test]
    fn delegation_sas_names_the_key_and_signs_with_it() {
        let key = DelegationKey {
            object_id: "oid".into(),
            tenant_id: "tid".into(),
            start: "2026-01-01T00:00:00Z".into(),
            expiry: "2026-01-02T00:00:00Z".into(),
            service: "b".into(),
            version: "2018-11-09".into(),
            value: "a2V5a2V5a2V5".into(),
        };
        let now = DateTime::parse_from_rfc3339("2026-01-01T01:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let sas = blob_read_delegation_sas(
            &key,
            "acct",
            "c",
            "f/P-1.ndjson",
            now,
            now + TimeDelta::hours(2),
        )
        .unwrap();
        let expected = hmac_sha256(
            "r\n2026-01-01T00:55:00Z\n2026-01-01T03:00:00Z\n/blob/acct/c/f/P-1.ndjson\noid\ntid\n\
             2026-01-01T00:00:00Z\n2026-01-02T00:00:00Z\nb\n2018-11-09\n\nhttps\n2018-11-09\nb\n\n\n\n\n\n",
            &Secret::new("a2V5a2V5a2V5".to_string()),
        )
        .unwrap();
        assert!(sas.contains("skoid=oid&sktid=tid"), "{sas}");
        assert!(sas.ends_with(&format!(
            "sig={}",
            form_urlencoded::byte_serialize(expected.as_bytes()).collect::<String>()
        )));
    }
}
