//! A real `redis-server` for tests: started on a free loopback port, killed when dropped; it can
//! be frozen (SIGSTOP) to play a slow Redis. [`RedisCluster`]: three real cluster nodes.
//! `scripts/test.sh` installs the Debian package when it is missing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    persistent: bool,
}

async fn ping_port(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await,
        Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
    )
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl RedisServer {
    /// No persistence: the harness default.
    pub async fn start() -> RedisServer {
        Self::start_with(false).await
    }

    /// With an append-only file (fsync always) in a temp dir, so data survives a kill + restart.
    pub async fn start_persistent() -> RedisServer {
        Self::start_with(true).await
    }

    async fn start_with(persistent: bool) -> RedisServer {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("tokengate-redis-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut s = RedisServer {
            port,
            child: None,
            dir,
            persistent,
        };
        s.spawn().await;
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--protected-mode")
            .arg("yes")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .spawn()
            .expect("redis-server runs (scripts/test.sh installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if self.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub async fn ping(&self) -> bool {
        ping_port(self.port).await
    }

    /// SIGKILL: the server is gone at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers. The returned guard
    /// resumes it (SIGCONT) when dropped, also when the test panics.
    pub fn freeze(&self) -> Frozen {
        let pid = self.child.as_ref().expect("redis-server running").id();
        signal("-STOP", pid);
        Frozen { pid: Some(pid) }
    }

    /// Starts again on the same port (and, when persistent, with the same data).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

/// A frozen (SIGSTOPped) redis-server; dropping it, or [`Frozen::thaw`], sends SIGCONT.
pub struct Frozen {
    pid: Option<u32>,
}

impl Frozen {
    pub fn thaw(mut self) {
        if let Some(pid) = self.pid.take() {
            signal("-CONT", pid);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            signal("-CONT", pid);
        }
    }
}

fn signal(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process would not act on SIGKILL until resumed on some systems.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real three-node Redis Cluster (three primaries, no replicas) on free loopback ports.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let dir = std::env::temp_dir().join(format!(
            "tokengate-redis-cluster-{}-{}",
            std::process::id(),
            ports[0]
        ));
        let _ = std::fs::create_dir_all(&dir);
        let mut cluster = RedisCluster {
            ports: ports.clone(),
            children: Vec::new(),
            dir,
        };
        for p in &ports {
            let child = Command::new("redis-server")
                .arg("--port")
                .arg(p.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--dir")
                .arg(&cluster.dir)
                .arg("--cluster-enabled")
                .arg("yes")
                // The bus port defaults to port + 10000, which may not exist for a random port.
                .arg("--cluster-port")
                .arg(free_port().to_string())
                .arg("--cluster-config-file")
                .arg(cluster.dir.join(format!("nodes-{p}.conf")))
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs");
            cluster.children.push(child);
        }
        for p in &ports {
            let mut up = false;
            for _ in 0..200 {
                if ping_port(*p).await {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            assert!(up, "cluster node on port {p} did not start");
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for _ in 0..400 {
            if ports.iter().all(|p| cluster_ok(*p)) {
                return cluster;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the cluster did not reach cluster_state:ok");
    }

    /// Every node, comma-separated: the `session.redis_url` form for a Redis Cluster.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn cluster_ok(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "info"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
