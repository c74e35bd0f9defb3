//! Who a Patient or Group export is about: a Group's active members (nested Groups followed)
//! and the patients a `patient` parameter names.

use std::collections::HashSet;

use chrono::Utc;

use super::{Error, Exporter};
use crate::{db::resources, fhir::group};

impl Exporter {
    /// The patients named by `patient`: each must exist and, for a Group export, be a member.
    /// Lenient handling drops the others with a note. One query for all of them.
    pub(super) async fn chosen_patients(
        &self,
        requested: &[String],
        members: Option<&[String]>,
        lenient: bool,
        ignored: &mut Vec<String>,
    ) -> Result<Vec<String>, Error> {
        let existing: HashSet<String> = resources::existing_patients(&self.pool, requested)
            .await?
            .into_iter()
            .collect();
        let members: Option<HashSet<&str>> =
            members.map(|m| m.iter().map(String::as_str).collect());
        let mut chosen = Vec::with_capacity(requested.len());
        for id in requested {
            let problem = if !existing.contains(id) {
                Some(format!("patient Patient/{id} does not exist"))
            } else if members.as_ref().is_some_and(|m| !m.contains(id.as_str())) {
                Some(format!("patient Patient/{id} is not a member of the Group"))
            } else {
                None
            };
            match problem {
                None => chosen.push(id.clone()),
                Some(why) if lenient => ignored.push(why),
                Some(why) => return Err(Error::Invalid(why)),
            }
        }
        chosen.sort();
        Ok(chosen)
    }

    /// The active member patients of a Group, following nested Groups (each once), and the
    /// Groups walked. One query per level of nesting; the JSON is read off the request threads.
    /// An unknown Group is a 404.
    pub(super) async fn group_members(
        &self,
        id: &str,
    ) -> Result<(Vec<String>, Vec<String>), Error> {
        let now = Utc::now();
        let mut seen: HashSet<String> = HashSet::from([id.to_string()]);
        let mut level = vec![id.to_string()];
        let (mut patients, mut walked) = (Vec::new(), Vec::new());
        while !level.is_empty() {
            let bodies = resources::read_current_many(&self.pool, "Group", &level).await?;
            if walked.is_empty() && bodies.is_empty() {
                return Err(Error::NotFound(format!("Group/{id} is not known")));
            }
            // A nested Group that does not exist has no members.
            walked.extend(bodies.iter().map(|(group, _)| group.clone()));
            let base = self.base_url.clone();
            let found = tokio::task::spawn_blocking(move || {
                let mut found = group::Members::default();
                for (group_id, body) in bodies {
                    let members = group::active_members(&body, now, &base).map_err(|e| {
                        Error::Unprocessable(format!(
                            "Group/{group_id} has members this server cannot read: {e}"
                        ))
                    })?;
                    found.patients.extend(members.patients);
                    found.groups.extend(members.groups);
                }
                Ok::<_, Error>(found)
            })
            .await
            .map_err(|e| Error::Internal(e.into()))??;
            patients.extend(found.patients);
            level = found
                .groups
                .into_iter()
                .filter(|g| seen.insert(g.clone()))
                .collect();
        }
        patients.sort_unstable();
        patients.dedup();
        Ok((patients, walked))
    }
}
