//! A real etcd server for tests (feature `testing`): the `etcd` binary from the system's
//! packages, on ports the OS chose, with its data in a temporary directory.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd; killed (and its data removed) on drop.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Panics with a clear message when the `etcd`
    /// binary is missing: the test command installs it (package `etcd-server`).
    pub async fn start() -> EtcdServer {
        let dir = tempfile::tempdir().expect("temporary directory for etcd");
        let client_port = free_port();
        let peer_port = free_port();
        let mut e = EtcdServer {
            child: None,
            dir,
            client_port,
            peer_port,
        };
        e.spawn();
        e.wait_ready(Duration::from_secs(20)).await;
        e
    }

    fn binary() -> PathBuf {
        if let Ok(p) = std::env::var("HOPPS_TEST_ETCD") {
            return PathBuf::from(p);
        }
        PathBuf::from("etcd")
    }

    fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(Self::binary())
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("test={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log file"),
            ))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "could not start etcd ({e}); install it (apt-get install etcd-server, as the \
                     test command does) or set HOPPS_TEST_ETCD to its path"
                )
            });
        self.child = Some(child);
    }

    async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let eps = vec![self.endpoint()];
        loop {
            if let Ok(mut c) = crate::connect(&eps).await
                && c.get("/", None).await.is_ok()
            {
                return;
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                panic!("etcd did not answer within {within:?}; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `127.0.0.1:port` of the client API.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL) and keeps its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready(Duration::from_secs(20)).await;
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}
