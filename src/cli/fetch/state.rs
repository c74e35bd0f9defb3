//! What the output folder remembers between runs.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

pub(super) const STATE_FILE: &str = "fetch-state.json";

/// What DIR remembers between runs.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct State {
    /// The kick-off this state belongs to (method and URL).
    pub(super) request: String,
    pub(super) status_url: Option<String>,
    /// Finished files: name → lines.
    pub(super) done: BTreeMap<String, u64>,
}

impl State {
    pub(super) async fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let temp = dir.join(format!("{STATE_FILE}.tmp"));
        tokio::fs::write(&temp, serde_json::to_vec_pretty(self)?).await?;
        tokio::fs::rename(&temp, dir.join(STATE_FILE)).await?;
        Ok(())
    }
}
