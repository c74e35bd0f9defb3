//! The de-identification configuration a kick-off names, read from the storage's
//! `anonymization` container and checked before the job exists.

use super::{Error, Exporter};
use crate::{containers::ANONYMIZATION, deid::Deidentifier};

/// The largest anonymization configuration read (the Safe Harbor sample is 14 KB).
const MAX_CONFIG_BYTES: usize = 1 << 20;

impl Exporter {
    /// Reads and checks the configuration `name`: every problem with it (missing, another ETag,
    /// not valid) is a 400 naming it.
    pub(super) async fn anonymization_config(
        &self,
        name: &str,
        etag: Option<&str>,
    ) -> Result<String, Error> {
        let file = self
            .storage
            .read_small(ANONYMIZATION, name, MAX_CONFIG_BYTES)
            .await?
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "_anonymizationConfig: there is no configuration '{name}' in the \
                     '{ANONYMIZATION}' container of the export storage"
                ))
            })?;
        // ETags are compared without their quotes (clients pass them either way).
        let bare = |e: &str| {
            e.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_string()
        };
        if let Some(wanted) = etag
            && bare(wanted) != bare(&file.etag)
        {
            return Err(Error::Invalid(format!(
                "_anonymizationConfigEtag {wanted} does not match the configuration '{name}', \
                 whose ETag is {}",
                file.etag
            )));
        }
        if file.bytes.len() > MAX_CONFIG_BYTES {
            return Err(Error::Invalid(format!(
                "_anonymizationConfig '{name}' is larger than {MAX_CONFIG_BYTES} bytes"
            )));
        }
        let text = String::from_utf8(file.bytes)
            .ok()
            .filter(|text| !text.contains('\0'))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "_anonymizationConfig '{name}' is not UTF-8 text without NUL characters"
                ))
            })?;
        Deidentifier::validate(&text)
            .map_err(|why| Error::Invalid(format!("_anonymizationConfig '{name}': {why}")))?;
        Ok(text)
    }
}
