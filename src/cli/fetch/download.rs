//! The manifest's files: their names in the folder, downloaded in parallel, line counts checked.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::sync::Mutex;

use super::{Download, FetchArgs, client::Client, state::State};

pub(super) struct Summary {
    pub(super) files: usize,
    pub(super) resources: u64,
    /// The first lines of the server's error files, summarised.
    pub(super) errors: Vec<String>,
}

/// Names follow the manifest's order per type: `Patient-1.ndjson`, …; deletions under
/// `deleted/`, the server's error files under `error/`.
pub(super) fn downloads(manifest: &Value, gzip: bool) -> anyhow::Result<(Vec<Download>, bool)> {
    let requires_token = manifest["requiresAccessToken"].as_bool().unwrap_or(false);
    let mut list = Vec::new();
    let mut numbers: BTreeMap<String, u32> = BTreeMap::new();
    let extension = if gzip { "ndjson.gz" } else { "ndjson" };
    for (key, folder) in [("output", ""), ("deleted", "deleted/"), ("error", "error/")] {
        for entry in manifest[key].as_array().into_iter().flatten() {
            let url = entry["url"]
                .as_str()
                .context("a manifest entry without url")?;
            let kind = entry["type"].as_str().unwrap_or("Resource");
            // Letters only: a name from the server never leaves DIR.
            if !kind.chars().all(|c| c.is_ascii_alphanumeric()) {
                bail!("the manifest names a file type '{kind}'");
            }
            let n = numbers.entry(format!("{folder}{kind}")).or_default();
            *n += 1;
            list.push(Download {
                url: url.to_string(),
                name: format!("{folder}{kind}-{n}.{extension}"),
                count: entry["count"].as_u64(),
                is_error: key == "error",
            });
        }
    }
    Ok((list, requires_token))
}

pub(super) async fn download_all(
    client: &Arc<Client>,
    args: &FetchArgs,
    manifest: &Value,
    state: Arc<Mutex<State>>,
) -> anyhow::Result<Summary> {
    let (files, requires_token) = downloads(manifest, args.gzip)?;
    let total = files.len();
    let overall = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} files")
            .expect("valid template"),
    );
    // One task per file (at most `parallel` at once): each download's copying and line
    // counting runs on its own thread, not all on one.
    let (client, out) = (client.clone(), Arc::new(args.out.clone()));
    let permits = Arc::new(tokio::sync::Semaphore::new(args.parallel as usize));
    let mut running = tokio::task::JoinSet::new();
    for (index, file) in files.iter().enumerate() {
        let (state, overall, client, out, permits) = (
            state.clone(),
            overall.clone(),
            client.clone(),
            out.clone(),
            permits.clone(),
        );
        let (file, gzip) = (file.clone(), args.gzip);
        running.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let already = state.lock().await.done.get(&file.name).copied();
            let lines = match already {
                Some(lines) => lines,
                None => {
                    let lines = client
                        .download(&file, &out, gzip, requires_token)
                        .await
                        .with_context(|| format!("downloading {}", file.url))?;
                    let mut state = state.lock().await;
                    state.done.insert(file.name.clone(), lines);
                    state.save(&out).await?;
                    lines
                }
            };
            overall.inc(1);
            anyhow::Ok((index, lines))
        });
    }
    let mut downloaded = Vec::with_capacity(files.len());
    while let Some(result) = running.join_next().await {
        let (index, lines) = result.context("a download task failed")??;
        downloaded.push((&files[index], lines));
    }
    overall.finish_and_clear();
    let mut summary = Summary {
        files: total,
        resources: 0,
        errors: Vec::new(),
    };
    for (file, lines) in downloaded {
        if file.is_error {
            summary
                .errors
                .extend(error_lines(&args.out.join(&file.name), args.gzip).await?);
        } else {
            summary.resources += lines;
        }
    }
    Ok(summary)
}

/// The diagnostics of an error file's OperationOutcomes (the first ten).
pub(super) async fn error_lines(path: &Path, gzip: bool) -> anyhow::Result<Vec<String>> {
    let bytes = tokio::fs::read(path).await?;
    let text = if gzip {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)?;
        out
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .flat_map(|o| {
            o["issue"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["diagnostics"].as_str().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .take(10)
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn manifest_files_get_names_that_stay_in_the_folder() {
        let manifest = json!({
            "requiresAccessToken": true,
            "output": [
                {"type": "Patient", "url": "https://x/a", "count": 2},
                {"type": "Patient", "url": "https://x/b", "count": 1},
                {"type": "Observation", "url": "https://x/c"}
            ],
            "deleted": [{"type": "Bundle", "url": "https://x/d"}],
            "error": [{"type": "OperationOutcome", "url": "https://x/e"}]
        });
        let (files, token) = downloads(&manifest, false).unwrap();
        assert!(token);
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Patient-1.ndjson",
                "Patient-2.ndjson",
                "Observation-1.ndjson",
                "deleted/Bundle-1.ndjson",
                "error/OperationOutcome-1.ndjson"
            ]
        );
        let hostile = json!({"output": [{"type": "../../etc", "url": "https://x/a"}]});
        assert!(downloads(&hostile, false).is_err());
    }
}
