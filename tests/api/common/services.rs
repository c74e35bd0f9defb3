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
