//! Load test: `--clients` concurrent clients poll a running export's status and kick off exports
//! of their own for `--seconds`, while that export runs. Reports latency percentiles per kind of
//! request and the answers seen, then checks the export against the database (each type's count
//! of live resources at its transaction time). Run by `bench/hostile.sh`.
//!
//!   cargo run --release --example hostile_load -- --base URL --database URL [--clients N] [--seconds S]

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde_json::Value;

struct Args {
    base: String,
    database: String,
    clients: usize,
    seconds: u64,
}

fn args() -> Args {
    let mut args = Args {
        base: String::new(),
        database: String::new(),
        clients: 200,
        seconds: 60,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--base" => args.base = value,
            "--database" => args.database = value,
            "--clients" => args.clients = value.parse().expect("--clients N"),
            "--seconds" => args.seconds = value.parse().expect("--seconds S"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(
        !args.base.is_empty() && !args.database.is_empty(),
        "--base and --database are needed"
    );
    args
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Poll,
    KickOff,
}

async fn kick_off(client: &reqwest::Client, url: &str) -> reqwest::Result<reqwest::Response> {
    client
        .get(url)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(args.clients)
        .build()?;
    let big = kick_off(&client, &format!("{}/$export", args.base)).await?;
    anyhow::ensure!(
        big.status() == 202,
        "the big export was not accepted: {}",
        big.status()
    );
    let status_url = big.headers()["content-location"].to_str()?.to_string();

    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..args.clients {
        let (client, status_url, base) = (client.clone(), status_url.clone(), args.base.clone());
        tasks.spawn(async move {
            let mut seen: Vec<(Kind, u16, Duration)> = Vec::new();
            let mut i = n;
            while Instant::now() < until {
                i += 1;
                let kind = if i % 2 == 0 {
                    Kind::Poll
                } else {
                    Kind::KickOff
                };
                let started = Instant::now();
                let answer = match kind {
                    Kind::Poll => client.get(&status_url).send().await,
                    Kind::KickOff => {
                        kick_off(&client, &format!("{base}/$export?_type=Patient")).await
                    }
                };
                let status = match answer {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let _ = r.bytes().await;
                        status
                    }
                    Err(_) => 0,
                };
                seen.push((kind, status, started.elapsed()));
            }
            seen
        });
    }
    let mut latencies: BTreeMap<Kind, Vec<Duration>> = BTreeMap::new();
    let mut answers: BTreeMap<(Kind, u16), usize> = BTreeMap::new();
    while let Some(seen) = tasks.join_next().await {
        for (kind, status, took) in seen? {
            latencies.entry(kind).or_default().push(took);
            *answers.entry((kind, status)).or_default() += 1;
        }
    }
    println!("{} clients for {} s", args.clients, args.seconds);
    println!(
        "{:<10} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "request", "count", "p50 ms", "p95 ms", "p99 ms", "max ms"
    );
    let mut all = Vec::new();
    for (kind, mut times) in latencies {
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<10} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            format!("{kind:?}"),
            times.len(),
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.95)),
            ms(percentile(&times, 0.99)),
            ms(*times.last().unwrap())
        );
        all.extend(times);
    }
    all.sort();
    println!(
        "all: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&all, 0.5).as_secs_f64() * 1000.0,
        percentile(&all, 0.99).as_secs_f64() * 1000.0
    );
    println!("answers (0 = no answer): {answers:?}");

    // The big export: finished, and exact against the database.
    let manifest: Value = loop {
        let r = client.get(&status_url).send().await?;
        match r.status().as_u16() {
            200 => break r.json().await?,
            202 => tokio::time::sleep(Duration::from_millis(500)).await,
            other => anyhow::bail!("the big export answered {other}: {}", r.text().await?),
        }
    };
    let mut exported: BTreeMap<String, i64> = BTreeMap::new();
    for entry in manifest["output"].as_array().unwrap() {
        let text = client
            .get(entry["url"].as_str().unwrap())
            .send()
            .await?
            .text()
            .await?;
        *exported
            .entry(entry["type"].as_str().unwrap().to_string())
            .or_default() += text.lines().count() as i64;
    }
    let pool = sqlx::PgPool::connect(&args.database).await?;
    let at: chrono::DateTime<chrono::Utc> =
        manifest["transactionTime"].as_str().unwrap().parse()?;
    let expected: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT resource_type, count(*) FROM (
           SELECT DISTINCT ON (resource_type, id) resource_type, body IS NULL AS deleted
           FROM resources WHERE last_updated <= $1
           ORDER BY resource_type, id, version_id DESC) s
         WHERE NOT deleted GROUP BY resource_type",
    )
    .bind(at)
    .fetch_all(&pool)
    .await?
    .into_iter()
    .collect();
    let total: i64 = exported.values().sum();
    anyhow::ensure!(
        exported == expected,
        "the export is not exact: {exported:?} vs {expected:?}"
    );
    println!(
        "the export finished exact: {total} resources in {} types",
        exported.len()
    );
    Ok(())
}
