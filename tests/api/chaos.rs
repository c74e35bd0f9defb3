//! Chaos: three server processes on one database, each with its own part size, export (system,
//! Patient, Group, and a chain of `_since` exports) while four writers update and delete
//! resources through the API, a fifth posts large transaction Bundles, and a sixth holds its
//! write transactions open for seconds (across kick-offs) — and meanwhile replicas are killed (-9) and frozen
//! (SIGSTOP/SIGCONT) at random, Postgres restarts (`pg_ctl restart -m fast`) and Azurite pauses
//! for 30 s. Every job must complete, and every manifest must be exact against the store's own
//! history at its transaction time, computed here independently: no duplicate, no gap in file
//! numbers, each job's files cut at its own part size, and the chained exports together holding
//! every version written.
//!
//! The test runs its own Postgres cluster and Azurite, so the faults disturb nothing else.
//! Size: CHAOS_PATIENTS (default 6), CHAOS_SECONDS of faults (default 70), CHAOS_PART_SIZE
//! (default 40), CHAOS_RANGE_SIZE (default 300), CHAOS_SEED.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{ChildProcess, binary, services::*};
use chrono::{DateTime, Utc};
use reqwest::Client;
use serde_json::{Value, json};
use sqlx::PgPool;

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// SplitMix64: a seeded, repeatable sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.next() % (to - from))
    }
}

/// One `fhir-export serve` process, restarted after a kill.
struct Replica {
    port: u16,
    part_size: i32,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Mutex<Option<ChildProcess>>,
}

impl Replica {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits until it answers; a start that fails (the storage check
    /// during an Azurite pause) is tried again.
    async fn start(&self, client: &Client) {
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let mut command = Command::new(binary());
            command
                .arg("serve")
                .env_remove("FHIR_EXPORT_CONFIG")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(log);
            let mut child = ChildProcess::spawn(&mut command);
            let deadline = Instant::now() + Duration::from_secs(40);
            let up = loop {
                if client
                    .get(format!("{}/metadata", self.base()))
                    .send()
                    .await
                    .is_ok()
                {
                    break true;
                }
                if child.exited() || Instant::now() > deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if up {
                *self.child.lock().unwrap() = Some(child);
                return;
            }
            child.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    Kill,
    Freeze,
    PostgresRestart,
    AzuritePause,
}

/// A job the test kicked off, and what it asked for.
#[derive(Debug, Clone)]
struct Job {
    path: String,
    part_size: i32,
    level: Level,
    since: Option<String>,
    history: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Level {
    System,
    Patient,
    Group {
        members: BTreeSet<String>,
        id: String,
    },
}

struct Shared {
    replicas: Vec<Replica>,
    client: Client,
    stop: AtomicBool,
    writes: AtomicUsize,
}

impl Shared {
    fn any_base(&self, n: u64) -> String {
        self.replicas[(n % self.replicas.len() as u64) as usize].base()
    }

    /// Kicks off on any replica that answers; retried through faults.
    async fn kick_off(&self, rng_seed: u64, query: &str) -> (String, i32) {
        let mut n = rng_seed;
        loop {
            n += 1;
            let replica = &self.replicas[(n % self.replicas.len() as u64) as usize];
            let response = self
                .client
                .get(format!("{}{query}", replica.base()))
                .header("accept", "application/fhir+json")
                .header("prefer", "respond-async")
                .send()
                .await;
            if let Ok(r) = response
                && r.status() == 202
            {
                let location = r.headers()["content-location"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let path = location.trim_start_matches(&replica.base()).to_string();
                return (path, replica.part_size);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Polls a job on any replica until its manifest is there; a failed job fails the test.
    async fn manifest(&self, path: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut n = 0;
        loop {
            n += 1;
            if let Ok(r) = self
                .client
                .get(format!("{}{path}", self.any_base(n)))
                .send()
                .await
            {
                let status = r.status().as_u16();
                match status {
                    200 => return r.json().await.unwrap(),
                    202 => {}
                    // A replica that could not answer (its database restarting) says so; a job
                    // that failed says "the export failed".
                    500..=504 => {
                        let text = r.text().await.unwrap_or_default();
                        assert!(!text.contains("export failed"), "job {path}: {text}");
                    }
                    _ => panic!(
                        "job {path}: {status} {}",
                        r.text().await.unwrap_or_default()
                    ),
                }
            }
            assert!(Instant::now() < deadline, "job {path} did not finish");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_stay_exact_through_kills_freezes_restarts_and_a_storage_pause() {
    let patients: u32 = setting("CHAOS_PATIENTS", 6);
    let chaos_secs: u64 = setting("CHAOS_SECONDS", 70);
    let part: i32 = setting("CHAOS_PART_SIZE", 40);
    let range: i64 = setting("CHAOS_RANGE_SIZE", 300);
    let seed: u64 = setting("CHAOS_SEED", Utc::now().timestamp_micros() as u64);
    eprintln!("chaos: seed {seed}, {patients} patients, {chaos_secs} s of faults");
    let mut rng = Rng(seed);

    let cluster = PgCluster::start(&["max_connections=300", "fsync=off"]);
    let azurite = Azurite::start().await;
    let database = cluster.url("fhir");
    let logs = tempfile::tempdir().unwrap();

    // The store: generated data, loaded before the replicas start.
    let pool = fhir_export::db::connect(&database, 8).await.unwrap();
    fhir_export::db::migrate(&pool).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    fhir_export::cli::generate::generate(&fhir_export::cli::generate::GenerateArgs {
        patients,
        seed: 11,
        out: data.path().to_path_buf(),
    })
    .unwrap();
    let files = fhir_export::cli::load::collect_files(&[data.path().to_path_buf()]).unwrap();
    let args = fhir_export::cli::load::LoadArgs {
        paths: vec![],
        skip_invalid: false,
        batch_size: 2000,
        writers: 2,
        online: false,
        base_url: None,
    };
    let loaded = fhir_export::cli::load::load_files(&pool, files, &args)
        .await
        .unwrap();
    eprintln!("chaos: loaded {} resources", loaded.total());

    let client = Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let part_sizes = [part, part * 2 + 7, part * 5 + 3];
    let replicas: Vec<Replica> = part_sizes
        .iter()
        .enumerate()
        .map(|(i, &part_size)| {
            let port = free_port();
            let env = [
                ("DATABASE_URL", database.clone()),
                ("FHIR_EXPORT_LISTEN", format!("127.0.0.1:{port}")),
                ("FHIR_EXPORT_STORAGE", "azure".into()),
                (
                    "AZURE_STORAGE_CONNECTION_STRING",
                    azurite.connection_string(),
                ),
                ("FHIR_EXPORT_WORKERS", "2".into()),
                ("FHIR_EXPORT_PART_SIZE", part_size.to_string()),
                ("FHIR_EXPORT_RANGE_SIZE", range.to_string()),
                ("FHIR_EXPORT_STALE_AFTER_SECS", "10".into()),
                ("FHIR_EXPORT_MAX_ATTEMPTS", "1000".into()),
                ("FHIR_EXPORT_MAX_ACTIVE_JOBS", "1000".into()),
                ("FHIR_EXPORT_POLL_INTERVAL_MS", "200".into()),
                ("RUST_LOG", "info".into()),
            ];
            Replica {
                port,
                part_size,
                env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                log: logs.path().join(format!("replica-{i}.log")),
                child: Mutex::new(None),
            }
        })
        .collect();
    let shared = Arc::new(Shared {
        replicas,
        client: client.clone(),
        stop: AtomicBool::new(false),
        writes: AtomicUsize::new(0),
    });
    for replica in &shared.replicas {
        replica.start(&client).await;
    }

    // A Group of a tenth of the patients.
    let patient_ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM resources WHERE resource_type = 'Patient' AND is_current ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let members: BTreeSet<String> = patient_ids.iter().step_by(10).cloned().collect();
    let group = json!({"resourceType": "Group", "id": "chaos", "type": "person", "actual": true,
        "member": members.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect::<Vec<_>>()});
    let put = client
        .put(format!("{}/Group/chaos", shared.replicas[0].base()))
        .header("content-type", "application/fhir+json")
        .body(group.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);

    // Writers: updates and deletes through the API, on any replica.
    let targets: Vec<(String, String)> = sqlx::query_as(
        "SELECT resource_type, id FROM resources WHERE is_current
           AND resource_type IN ('Patient', 'Observation', 'Condition', 'Encounter')
         ORDER BY seq LIMIT 3000",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let targets = Arc::new(targets);
    let mut writers = tokio::task::JoinSet::new();
    // The slow writer: 300 updates in one transaction Bundle, again and again.
    let bodies: Vec<Value> = sqlx::query_scalar(
        "SELECT body::json FROM resources WHERE is_current AND body IS NOT NULL
           AND resource_type IN ('Observation', 'Condition') ORDER BY seq DESC LIMIT 1200",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    {
        let shared = shared.clone();
        let mut rng = Rng(seed ^ 0xB0D1E);
        writers.spawn(async move {
            let mut n = 0u64;
            while !shared.stop.load(Ordering::Relaxed) {
                n += 1;
                let start = rng.below(bodies.len() - 300);
                let entries: Vec<Value> = bodies[start..start + 300]
                    .iter()
                    .map(|body| {
                        let mut body = body.clone();
                        body["text"] = json!({"status": "generated",
                            "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">bundle {n}</div>")});
                        let url = format!("{}/{}", body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
                        json!({"resource": body, "request": {"method": "PUT", "url": url}})
                    })
                    .collect();
                let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
                let posted = shared
                    .client
                    .post(format!("{}/", shared.any_base(rng.next())))
                    .header("content-type", "application/fhir+json")
                    .body(bundle.to_string())
                    .send()
                    .await;
                if posted.is_ok_and(|r| r.status().is_success()) {
                    shared.writes.fetch_add(300, Ordering::Relaxed);
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
    for w in 0..4u64 {
        let (shared, targets) = (shared.clone(), targets.clone());
        let mut rng = Rng(seed ^ ((w + 1) * 7919));
        writers.spawn(async move {
            let mut n = 0u64;
            while !shared.stop.load(Ordering::Relaxed) {
                n += 1;
                let (t, id) = &targets[rng.below(targets.len())];
                let base = shared.any_base(rng.next());
                let url = format!("{base}/{t}/{id}");
                let done = if t != "Patient" && rng.below(4) == 0 {
                    shared.client.delete(&url).send().await.is_ok_and(|r| r.status().is_success())
                } else {
                    let body = match shared.client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => r.json::<Value>().await.ok(),
                        Ok(r) if r.status() == 410 => Some(json!({"resourceType": t, "id": id})),
                        _ => None,
                    };
                    match body {
                        Some(mut body) => {
                            body["text"] = json!({"status": "generated",
                                "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">w{w} n{n}</div>")});
                            shared
                                .client
                                .put(&url)
                                .header("content-type", "application/fhir+json")
                                .body(body.to_string())
                                .send()
                                .await
                                .is_ok_and(|r| r.status().is_success())
                        }
                        None => false,
                    }
                };
                if done {
                    shared.writes.fetch_add(1, Ordering::Relaxed);
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }

    // The writer that stays open: a few versions, then seconds before it commits.
    {
        let (shared, targets, database) = (shared.clone(), targets.clone(), database.clone());
        let mut rng = Rng(seed ^ 0x510E);
        writers.spawn(async move {
            let pool = fhir_export::db::connect(&database, 2).await.unwrap();
            while !shared.stop.load(Ordering::Relaxed) {
                let result = async {
                    let mut tx = fhir_export::db::resources::begin_write(&pool).await?;
                    for _ in 0..20 {
                        let (t, id) = &targets[rng.below(targets.len())];
                        let body = json!({"resourceType": t, "id": id,
                            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">slow</div>"}});
                        let Value::Object(map) = body else { unreachable!() };
                        let prepared = fhir_export::store::Prepared::new(t, id, map, "")
                            .expect("a valid resource");
                        fhir_export::store::put(&mut tx, &prepared, None).await?;
                        tokio::time::sleep(rng.millis(10, 100)).await;
                    }
                    tokio::time::sleep(rng.millis(2000, 6000)).await;
                    tx.commit().await?;
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                match result {
                    Ok(()) => {
                        shared.writes.fetch_add(20, Ordering::Relaxed);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
    }

    // Exports: system, Patient and Group now and halfway, and a chain of `_since` exports that
    // also ask for older versions, one after the other until the end.
    let jobs: Arc<Mutex<Vec<Job>>> = Arc::new(Mutex::new(Vec::new()));
    let kick_off_round = |shared: Arc<Shared>,
                          jobs: Arc<Mutex<Vec<Job>>>,
                          members: BTreeSet<String>,
                          n: u64| async move {
        let levels = [
            ("/$export", Level::System),
            ("/Patient/$export", Level::Patient),
            (
                "/Group/chaos/$export",
                Level::Group {
                    members,
                    id: "chaos".into(),
                },
            ),
        ];
        for (i, (query, level)) in levels.into_iter().enumerate() {
            let (path, part_size) = shared.kick_off(n + i as u64, query).await;
            jobs.lock().unwrap().push(Job {
                path,
                part_size,
                level,
                since: None,
                history: false,
            });
        }
    };
    kick_off_round(shared.clone(), jobs.clone(), members.clone(), rng.next()).await;
    let chain = {
        let (shared, jobs) = (shared.clone(), jobs.clone());
        let mut rng = Rng(seed ^ 0xC4A1);
        tokio::spawn(async move {
            let mut since: Option<String> = None;
            loop {
                let last = shared.stop.load(Ordering::Relaxed);
                let query = match &since {
                    None => "/$export?includeAssociatedData=_history".to_string(),
                    Some(t) => format!("/$export?includeAssociatedData=_history&_since={t}"),
                };
                let (path, part_size) = shared.kick_off(rng.next(), &query).await;
                jobs.lock().unwrap().push(Job {
                    path: path.clone(),
                    part_size,
                    level: Level::System,
                    since: since.clone(),
                    history: true,
                });
                let manifest = shared.manifest(&path).await;
                since = Some(manifest["transactionTime"].as_str().unwrap().to_string());
                if last {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        })
    };

    // Faults, in a random order, until the time is up; each kind at least once.
    let mut faults: BTreeMap<Fault, usize> = BTreeMap::new();
    let started = Instant::now();
    let (mut round, mut second_round) = (0, false);
    while started.elapsed() < Duration::from_secs(chaos_secs) || faults.len() < 4 {
        let mut kinds = vec![
            Fault::Kill,
            Fault::Freeze,
            Fault::PostgresRestart,
            Fault::Kill,
            Fault::Freeze,
        ];
        if round == 0 {
            kinds.push(Fault::AzuritePause);
        }
        for i in (1..kinds.len()).rev() {
            kinds.swap(i, rng.below(i + 1));
        }
        for fault in kinds {
            tokio::time::sleep(rng.millis(1000, 4000)).await;
            let target = rng.below(shared.replicas.len());
            inject(&shared, &cluster, &azurite, fault, target, &mut rng).await;
            *faults.entry(fault).or_default() += 1;
            if !second_round && faults.len() == 2 {
                kick_off_round(shared.clone(), jobs.clone(), members.clone(), rng.next()).await;
                second_round = true;
            }
        }
        round += 1;
    }
    shared.stop.store(true, Ordering::Relaxed);
    while writers.join_next().await.is_some() {}
    chain.await.unwrap();
    eprintln!(
        "chaos: faults {faults:?}; {} writes through the API",
        shared.writes.load(Ordering::Relaxed)
    );

    // Every job completes (including any a lost kick-off answer left unrecorded).
    let jobs = jobs.lock().unwrap().clone();
    let mut manifests = Vec::new();
    for job in &jobs {
        manifests.push(shared.manifest(&job.path).await);
    }
    let pool = fhir_export::db::connect(&database, 4).await.unwrap();
    let unfinished: Vec<(String, String)> = sqlx::query_as(
        "SELECT id::text, status::text || ': ' || coalesce(error, '') FROM export_jobs
         WHERE status <> 'completed'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        unfinished.is_empty(),
        "jobs that did not complete: {unfinished:?}"
    );

    let history = History::read(&pool).await;
    let mut checked = 0;
    let mut chain_versions: BTreeMap<(String, String, i32), usize> = BTreeMap::new();
    let mut chain_end = None;
    for (job, manifest) in jobs.iter().zip(&manifests) {
        let got = Downloaded::fetch(&shared.client, manifest).await;
        let at: DateTime<Utc> = manifest["transactionTime"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let expected = history.expected(job, at);
        assert_same(
            &got.output,
            &expected.output,
            &format!("{}: resources", job.path),
        );
        assert_same(
            &got.history,
            &expected.history,
            &format!("{}: older versions", job.path),
        );
        assert_same(
            &got.deleted,
            &expected.deleted,
            &format!("{}: deletions", job.path),
        );
        check_files(&pool, &job.path, job.part_size).await;
        checked += got.output.len() + got.history.len() + got.deleted.len();
        if job.history {
            for key in got.output.iter().chain(&got.history) {
                *chain_versions.entry(key.clone()).or_default() += 1;
            }
            chain_end = chain_end.max(Some(at));
        }
    }
    // The chain, link by link, holds every live version written up to its end, once.
    let every: BTreeSet<(String, String, i32)> = history.live_versions_until(chain_end.unwrap());
    let twice: Vec<_> = chain_versions.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "versions in two links of the chain: {twice:?}"
    );
    let union: BTreeSet<_> = chain_versions.keys().cloned().collect();
    assert_same(&union, &every, "the chain");
    eprintln!(
        "chaos: {} jobs exact ({} chain links), {checked} resources and versions checked, \
         {} versions in the chain",
        jobs.len(),
        jobs.iter().filter(|j| j.history).count(),
        every.len()
    );
}

/// Equal sets, or a message naming (some of) what is missing and what is extra.
fn assert_same<T: Ord + std::fmt::Debug>(got: &BTreeSet<T>, expected: &BTreeSet<T>, what: &str) {
    let missing: Vec<&T> = expected.difference(got).take(10).collect();
    let extra: Vec<&T> = got.difference(expected).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} missing, e.g. {missing:?}; {} extra, e.g. {extra:?}",
        expected.difference(got).count(),
        got.difference(expected).count()
    );
}

async fn inject(
    shared: &Shared,
    cluster: &PgCluster,
    azurite: &Azurite,
    fault: Fault,
    target: usize,
    rng: &mut Rng,
) {
    let replica = &shared.replicas[target];
    match fault {
        Fault::Kill => {
            if let Some(mut child) = replica.child.lock().unwrap().take() {
                child.kill();
            }
            tokio::time::sleep(rng.millis(500, 3000)).await;
            replica.start(&shared.client).await;
        }
        Fault::Freeze => {
            let pid = replica.child.lock().unwrap().as_ref().map(ChildProcess::id);
            if let Some(pid) = pid {
                signal(pid, "-STOP");
                // Often past the stale period (10 s): its tasks are rescued meanwhile.
                tokio::time::sleep(rng.millis(3000, 16000)).await;
                signal(pid, "-CONT");
            }
        }
        Fault::PostgresRestart => tokio::task::block_in_place(|| cluster.restart()),
        Fault::AzuritePause => {
            azurite.process.signal("-STOP");
            tokio::time::sleep(Duration::from_secs(30)).await;
            azurite.process.signal("-CONT");
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// Each job's files: numbered 1..n per kind, and cut at the job's part size (every part of a
/// task but its last is full).
async fn check_files(pool: &PgPool, path: &str, part_size: i32) {
    let id: uuid::Uuid = path.rsplit('/').next().unwrap().parse().unwrap();
    let job_part_size: i32 = sqlx::query_scalar("SELECT part_size FROM export_jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        job_part_size, part_size,
        "{path}: the kick-off replica's part size"
    );
    let parts: Vec<(String, i32, i64, i32, Option<i32>)> = sqlx::query_as(
        "SELECT resource_type, part_no, task_id, task_seq, resources FROM export_parts
         WHERE job_id = $1 ORDER BY resource_type, part_no",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut numbers: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    let mut tasks: BTreeMap<i64, Vec<(i32, i32)>> = BTreeMap::new();
    for (kind, part_no, task, task_seq, resources) in &parts {
        let resources =
            resources.unwrap_or_else(|| panic!("{path}: {kind}-{part_no} never committed"));
        numbers.entry(kind).or_default().push(*part_no);
        tasks.entry(*task).or_default().push((*task_seq, resources));
    }
    for (kind, numbers) in numbers {
        assert_eq!(
            numbers,
            (1..=numbers.len() as i32).collect::<Vec<_>>(),
            "{path}: {kind} numbering"
        );
    }
    for (task, mut parts) in tasks {
        parts.sort();
        let last = parts.len() - 1;
        for (i, (_, resources)) in parts.iter().enumerate() {
            assert!(
                *resources <= part_size,
                "{path}: task {task} part over the part size"
            );
            if i < last {
                assert_eq!(*resources, part_size, "{path}: task {task} cut short");
            }
        }
    }
}

type Key = (String, String, i32);

/// What a job's files hold: (type, id, version) of resources and older versions, and (type, id)
/// of deletions.
#[derive(Debug, Default)]
struct Downloaded {
    output: BTreeSet<Key>,
    history: BTreeSet<Key>,
    deleted: BTreeSet<(String, String)>,
}

impl Downloaded {
    async fn fetch(client: &Client, manifest: &Value) -> Downloaded {
        let mut got = Downloaded::default();
        for entry in manifest["output"].as_array().unwrap() {
            let url = entry["url"].as_str().unwrap();
            let text = download(client, url).await;
            let older = url.rsplit('/').next().unwrap().contains("-history-");
            let mut lines = 0;
            for line in text.lines() {
                lines += 1;
                let r: Value = serde_json::from_str(line).unwrap();
                let key = (
                    r["resourceType"].as_str().unwrap().to_string(),
                    r["id"].as_str().unwrap().to_string(),
                    r["meta"]["versionId"].as_str().unwrap().parse().unwrap(),
                );
                let set = if older {
                    &mut got.history
                } else {
                    &mut got.output
                };
                assert!(set.insert(key.clone()), "{key:?} twice in one export");
            }
            assert_eq!(entry["count"].as_u64().unwrap(), lines, "{url}: count");
        }
        for entry in manifest["deleted"].as_array().into_iter().flatten() {
            let text = download(client, entry["url"].as_str().unwrap()).await;
            for line in text.lines() {
                let bundle: Value = serde_json::from_str(line).unwrap();
                let url = bundle["entry"][0]["request"]["url"].as_str().unwrap();
                let (t, id) = url.split_once('/').unwrap();
                assert!(
                    got.deleted.insert((t.to_string(), id.to_string())),
                    "{url} deleted twice"
                );
            }
        }
        got
    }
}

async fn download(client: &Client, url: &str) -> String {
    for _ in 0..20 {
        if let Ok(r) = client.get(url).send().await
            && r.status() == 200
        {
            return r.text().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{url} could not be downloaded");
}

/// The patients whose compartments hold a version.
type Patients = Vec<String>;

/// One stored version: (version, last_updated, deleted, patient ids).
type Version = (i32, DateTime<Utc>, bool, Patients);

/// Every version in the store, read after the chaos: the truth the manifests are held to.
struct History {
    /// (type, id) → its versions in order.
    versions: HashMap<(String, String), Vec<Version>>,
}

struct Expected {
    output: BTreeSet<Key>,
    history: BTreeSet<Key>,
    deleted: BTreeSet<(String, String)>,
}

impl History {
    async fn read(pool: &PgPool) -> History {
        let rows: Vec<(String, String, i32, DateTime<Utc>, bool, Patients)> = sqlx::query_as(
            "SELECT resource_type, id, version_id, last_updated, body IS NULL, patient_ids
             FROM resources ORDER BY resource_type, id, version_id",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        let mut versions: HashMap<_, Vec<_>> = HashMap::new();
        for (t, id, v, at, deleted, patients) in rows {
            versions
                .entry((t, id))
                .or_default()
                .push((v, at, deleted, patients));
        }
        History { versions }
    }

    /// What a job with transaction time `at` must hold.
    fn expected(&self, job: &Job, at: DateTime<Utc>) -> Expected {
        let since: Option<DateTime<Utc>> = job.since.as_deref().map(|s| s.parse().unwrap());
        let after_since = |t: DateTime<Utc>| since.is_none_or(|s| t > s);
        let mut out = Expected {
            output: BTreeSet::new(),
            history: BTreeSet::new(),
            deleted: BTreeSet::new(),
        };
        for ((t, id), versions) in &self.versions {
            let Some(snapshot) = versions.iter().rev().find(|v| v.1 <= at) else {
                continue;
            };
            let (version, when, deleted, patients) = snapshot;
            let in_scope = match &job.level {
                Level::System => true,
                Level::Patient => !patients.is_empty(),
                Level::Group { members, id: group } => {
                    patients.iter().any(|p| members.contains(p)) && !(t == "Group" && id == group)
                }
            };
            if !in_scope || !after_since(*when) {
                continue;
            }
            if *deleted {
                if since.is_some() {
                    out.deleted.insert((t.clone(), id.clone()));
                }
            } else {
                out.output.insert((t.clone(), id.clone(), *version));
            }
            if job.history {
                for (v, when, deleted, _) in versions.iter().filter(|v| v.0 < *version) {
                    if !deleted && after_since(*when) {
                        out.history.insert((t.clone(), id.clone(), *v));
                    }
                }
            }
        }
        out
    }

    fn live_versions_until(&self, end: DateTime<Utc>) -> BTreeSet<Key> {
        let mut all = BTreeSet::new();
        for ((t, id), versions) in &self.versions {
            for (v, when, deleted, _) in versions {
                if !deleted && *when <= end {
                    all.insert((t.clone(), id.clone(), *v));
                }
            }
        }
        all
    }
}
