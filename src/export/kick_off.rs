//! A kick-off: parameters read and checked against the server's limits and the caller's
//! scopes, patients and Groups resolved, the job admitted under the quota and queued.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{Error, Exporter, require_export};
use crate::{
    auth::{Principal, scopes::Access},
    containers::{self, ANONYMIZATION},
    db::jobs::{self, Admission, JobSpec, Level, Quota},
    fhir::{bulk, instant, r4::RESOURCE_TYPES, type_filter},
};

/// A kick-off request, as the HTTP layer extracted it.
pub struct KickOff {
    pub level: Level,
    /// The Group of a Group-level export.
    pub group_id: Option<String>,
    /// The request's query string.
    pub query: String,
    /// A POST's `Parameters` body; empty for a GET.
    pub body: Bytes,
    /// `Prefer: handling=lenient`: what cannot be honoured is ignored, with a note.
    pub lenient: bool,
    /// `Prefer: separate-export-status`: the job's status answers are 200 with
    /// `X-Export-Status`.
    pub separate_status: bool,
    /// The kick-off URL (the manifest's `request`).
    pub request_url: String,
}

/// A queued job.
pub struct Accepted {
    pub id: Uuid,
    /// What a lenient kick-off ignored, one sentence each.
    pub ignored: Vec<String>,
}

/// The patients an export is limited to, and the Groups walked to find them.
struct Population {
    patients: Option<Vec<String>>,
    groups: Vec<String>,
}

impl Exporter {
    pub async fn kick_off(
        &self,
        principal: &Principal,
        request: KickOff,
    ) -> Result<Accepted, Error> {
        let mut params = self.parameters(&request).await?;
        self.check_limits(&params)?;
        if let Some(container) = &params.container {
            self.check_container(container)?;
        }
        params.types = exported_types(principal, &params)?;
        // A Group's members are read from the Group: its export needs leave to read Groups.
        if request.level == Level::Group
            && let Some(why) = principal.denied(Access::Read, "Group")
        {
            return Err(Error::Forbidden(format!(
                "{why}; a Group export reads the Group (grant system/Group.rs)"
            )));
        }
        let anonymization = match &params.anonymization_config {
            Some(name) => Some(
                self.anonymization_config(name, params.anonymization_etag.as_deref())
                    .await?,
            ),
            None => None,
        };
        let quota = self.quota();
        // Shed a busy server's load before resolving anything; `create` decides for good.
        let (total, own) = jobs::active_counts(&self.pool, principal.client_id.as_deref()).await?;
        if total >= quota.total || own >= quota.per_client {
            return Err(Error::Busy {
                everyone: total >= quota.total,
            });
        }
        let population = self.population(&request, &mut params).await?;
        let id = Uuid::new_v4();
        let kicked_off = jobs::now(&self.pool).await?;
        let mut spec = self.job_spec(id, principal, &request, params, &population, kicked_off);
        spec.anonymization_config = anonymization;
        let patients = population.patients.unwrap_or_default();
        match jobs::create(&self.pool, id, &spec, &patients, quota).await? {
            Admission::Accepted => {}
            Admission::Busy => return Err(Error::Busy { everyone: true }),
            Admission::ClientBusy => return Err(Error::Busy { everyone: false }),
        }
        log_accepted(id, &spec, patients.len());
        Ok(Accepted {
            id,
            ignored: spec.notes,
        })
    }

    /// The query's and the body's parameters, read off the threads that serve requests:
    /// parsing is linear but may be long (a 16 MiB body).
    async fn parameters(&self, request: &KickOff) -> Result<bulk::ExportParams, Error> {
        let (query, body) = (request.query.clone(), request.body.clone());
        let (system_level, lenient) = (request.level == Level::System, request.lenient);
        let base_url = self.base_url.to_string();
        tokio::task::spawn_blocking(move || {
            let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            if pairs.iter().any(|(name, _)| name == "patient") {
                return Err(Error::NotSupported(
                    "the patient parameter is only supported in a POST kick-off".into(),
                ));
            }
            if !body.is_empty() {
                let value: Value = serde_json::from_slice(&body)
                    .map_err(|e| Error::Invalid(format!("the body is not valid JSON: {e}")))?;
                pairs.extend(bulk::parameters_pairs(&value).map_err(Error::Invalid)?);
            }
            Ok(bulk::parse(
                &pairs,
                system_level,
                lenient,
                Utc::now(),
                &base_url,
            )?)
        })
        .await
        .map_err(|e| Error::Internal(e.into()))?
    }

    fn check_limits(&self, params: &bulk::ExportParams) -> Result<(), Error> {
        let limits = &self.config.export;
        if params.patients.len() > limits.max_patients {
            return Err(Error::TooCostly(format!(
                "a kick-off may name at most {} patients (export.max_patients); this one names {}",
                limits.max_patients,
                params.patients.len()
            )));
        }
        if params.type_filters.len() > limits.max_type_filters {
            return Err(Error::TooCostly(format!(
                "a kick-off may give at most {} _typeFilter entries (export.max_type_filters); \
                 this one gives {}",
                limits.max_type_filters,
                params.type_filters.len()
            )));
        }
        Ok(())
    }

    fn check_container(&self, container: &str) -> Result<(), Error> {
        containers::validate(container).map_err(Error::Invalid)?;
        // Output there could be read back as a de-identification configuration.
        if container == ANONYMIZATION {
            return Err(Error::Forbidden(format!(
                "_container '{ANONYMIZATION}' holds de-identification configurations; export \
                 output never goes there"
            )));
        }
        if !containers::allowed(&self.config.storage.allowed_containers, container) {
            return Err(Error::Forbidden(format!(
                "_container '{container}' is not one this server may write to \
                 (storage.allowed_containers)"
            )));
        }
        Ok(())
    }

    fn quota(&self) -> Quota {
        Quota {
            total: self.config.export.max_active_jobs,
            per_client: self.config.export.max_active_jobs_per_client,
        }
    }

    /// A Group's members, narrowed to the named `patient`s (which a lenient kick-off may drop,
    /// with a note in `params.ignored`).
    async fn population(
        &self,
        request: &KickOff,
        params: &mut bulk::ExportParams,
    ) -> Result<Population, Error> {
        let (mut patients, groups) = match &request.group_id {
            Some(id) => {
                let (patients, groups) = self.group_members(id).await?;
                (Some(patients), groups)
            }
            None => (None, Vec::new()),
        };
        if !params.patients.is_empty() {
            let chosen = self
                .chosen_patients(
                    &params.patients,
                    patients.as_deref(),
                    request.lenient,
                    &mut params.ignored,
                )
                .await?;
            patients = Some(chosen);
        }
        Ok(Population { patients, groups })
    }

    fn job_spec(
        &self,
        id: Uuid,
        principal: &Principal,
        request: &KickOff,
        params: bulk::ExportParams,
        population: &Population,
        kicked_off: DateTime<Utc>,
    ) -> JobSpec {
        let transaction_time = params.till.unwrap_or(kicked_off);
        let default_container = &self.config.storage.default_container;
        let (container, own_container) = match (&params.container, default_container.is_empty()) {
            (Some(c), _) => (c.clone(), false),
            (None, false) => (default_container.clone(), false),
            (None, true) => (format!("export-{}", id.simple()), true),
        };
        let settings = &self.config.export;
        JobSpec {
            level: request.level,
            request_url: request.request_url.clone(),
            transaction_time,
            since: params.since,
            until: params.until,
            types: params.types,
            named_patients: population.patients.is_some(),
            excluded_groups: population.groups.clone(),
            elements: params.elements,
            type_filters: params.type_filters,
            include_history: params.include_history,
            include_deleted: params.include_deleted,
            notes: params.ignored,
            owner: principal.client_id.clone(),
            container,
            own_container,
            folder: format!(
                "{}-{}",
                transaction_time.format("%Y%m%dT%H%M%S"),
                id.simple()
            ),
            part_size: i32::try_from(settings.part_size).expect("validated: at most 1000000"),
            part_max_bytes: i64::try_from(settings.part_max_bytes).unwrap_or(i64::MAX),
            range_size: settings.range_size,
            created_at: kicked_off,
            anonymization_seed: params.anonymization_config.as_ref().map(|_| {
                let mut seed = vec![0u8; 32];
                aws_lc_rs::rand::fill(&mut seed).expect("the system's random source");
                seed
            }),
            anonymization_name: params.anonymization_config,
            anonymization_config: None,
            separate_status: request.separate_status,
            organize_by: params.organize_by,
            allow_partial_manifests: params.allow_partial_manifests,
        }
    }
}

/// The types to export, within the caller's scopes: a `_type` or `_typeFilter` beyond them is a
/// 403; without `_type`, a caller limited to some types exports those.
fn exported_types(
    principal: &Principal,
    params: &bulk::ExportParams,
) -> Result<Vec<String>, Error> {
    let filtered = params
        .type_filters
        .iter()
        .map(|entry| type_filter::entry_type(entry));
    for t in params.types.iter().map(String::as_str).chain(filtered) {
        require_export(principal, t)?;
    }
    if !params.types.is_empty() || principal.scopes.exports_every_type() {
        return Ok(params.types.clone());
    }
    let granted: Vec<String> = RESOURCE_TYPES
        .iter()
        .filter(|t| principal.scopes.allows(Access::Export, t))
        .map(|t| t.to_string())
        .collect();
    if granted.is_empty() {
        return Err(Error::Forbidden(
            "the granted scopes allow exporting no resource type".into(),
        ));
    }
    Ok(granted)
}

/// The parameters as the job holds them; patients only counted (their ids are data).
fn log_accepted(id: Uuid, spec: &JobSpec, patients: usize) {
    tracing::info!(
        job = %id,
        client = spec.owner.as_deref().unwrap_or("-"),
        level = spec.level.as_str(),
        types = %spec.types.join(","),
        since = %spec.since.map(instant::format).unwrap_or_else(|| "-".into()),
        till = %instant::format(spec.transaction_time),
        until = %spec.until.map(instant::format).unwrap_or_else(|| "-".into()),
        type_filters = ?spec.type_filters,
        elements = %spec.elements.join(","),
        include_history = spec.include_history,
        include_deleted = spec.include_deleted,
        anonymization = spec.anonymization_name.as_deref().unwrap_or("-"),
        patients,
        container = %spec.container,
        "export accepted"
    );
}
