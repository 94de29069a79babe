//! A real `redis-server` for tests: started on a free loopback port, killed when dropped; it can
//! be frozen (SIGSTOP) to play a slow Redis, or serve TLS only ([`RedisServer::start_tls`], with
//! a private CA made by the `openssl` CLI). [`RedisCluster`]: three real cluster nodes.
//! `scripts/test.sh` installs the Debian package when it is missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    persistent: bool,
    tls: Option<TestCa>,
}

/// A private test CA and a server certificate it signed for `127.0.0.1` (IP SAN), as PEM files
/// in a directory: what the operator of an internal Redis has.
pub struct TestCa {
    /// The CA certificate: what `session.redis_ca_file` points to.
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The server requires a client certificate signed by the CA (mutual TLS); the server's own
    /// certificate (EKU clientAuth too) serves as the client's.
    pub mutual: bool,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("the openssl CLI runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `redis-cli` aimed at `port`, over TLS trusting `tls`'s CA when given.
fn cli_command(port: u16, tls: Option<&TestCa>) -> Command {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(ca) = tls {
        cmd.arg("--tls").arg("--cacert").arg(&ca.ca_file);
        if ca.mutual {
            cmd.arg("--cert")
                .arg(&ca.cert_file)
                .arg("--key")
                .arg(&ca.key_file);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

async fn cli_ping(port: u16, tls: Option<&TestCa>) -> bool {
    match tls {
        None => ping_port(port).await,
        Some(_) => cli_command(port, tls)
            .arg("PING")
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"PONG")),
    }
}

impl TestCa {
    /// redis-server arguments: TLS only on `port` (no plain port), clients not asked for
    /// certificates.
    fn server_args(&self, cmd: &mut Command, port: u16) {
        cmd.arg("--port")
            .arg("0")
            .arg("--tls-port")
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(&self.cert_file)
            .arg("--tls-key-file")
            .arg(&self.key_file)
            .arg("--tls-ca-cert-file")
            .arg(&self.ca_file)
            .args(["--tls-auth-clients", if self.mutual { "yes" } else { "no" }]);
    }

    /// Generates the CA and the server certificate (EC P-256, valid two days) into `dir`.
    pub fn generate(dir: &Path) -> TestCa {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        // `req -x509` marks the CA certificate basicConstraints CA:TRUE (openssl.cnf v3_ca).
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tokengate test CA",
        ]);
        openssl(dir, &ca);
        // webpki wants an end-entity certificate whose SAN names the address dialled; clientAuth
        // too because cluster nodes present it to each other (the cluster bus is mutual TLS).
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("write server.ext");
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(dir, &csr);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-CAserial",
                "ca.srl",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.pem",
            ],
        );
        TestCa {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
            mutual: false,
        }
    }
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

/// `n` distinct free loopback ports for servers the tests start (or reserve) by number, taken below the kernel's
/// ephemeral range: a port from `bind(0)` is ephemeral, so between the pick and redis-server's own
/// bind any outgoing connection of the (busy, parallel) test run could take it as its local port,
/// and the server would exit at once. Each port is checked by binding it, all are held until every
/// one is picked; a per-process start and a shared counter keep parallel tests apart.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, span) = non_ephemeral_ports();
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            k < span,
            "no free loopback port left outside the ephemeral range"
        );
        // 7 is coprime with every span used here, so k walks the whole range.
        let port = u16::try_from(low + (start + k * 7) % span).expect("a port number");
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// The first port and the length of a range of ports outside the kernel's ephemeral range.
fn non_ephemeral_ports() -> (u32, u32) {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = range
        .split_whitespace()
        .filter_map(|v| v.parse::<u32>().ok());
    let (lo, hi) = (it.next().unwrap_or(32768), it.next().unwrap_or(60999));
    if lo >= 12_000 {
        (lo - 10_000, 9_997)
    } else {
        (hi + 1, 65_535 - hi)
    }
}

/// Waits until `port` answers PING; false at once when `child` has exited (its port was taken
/// after all), or after 10 s.
async fn answers(child: &mut Child, port: u16, tls: Option<&TestCa>) -> bool {
    for _ in 0..400 {
        if cli_ping(port, tls).await {
            return true;
        }
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
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

    /// TLS only (no plain port), with a private CA generated for it ([`RedisServer::ca`]);
    /// clients are not asked for certificates.
    pub async fn start_tls() -> RedisServer {
        Self::start_inner(false, Some(false)).await
    }

    /// As [`RedisServer::start_tls`], and clients must present a certificate of the CA.
    pub async fn start_mutual_tls() -> RedisServer {
        Self::start_inner(false, Some(true)).await
    }

    async fn start_with(persistent: bool) -> RedisServer {
        Self::start_inner(persistent, None).await
    }

    /// `tls`: none, or TLS only with client certificates required (`Some(true)`) or not.
    async fn start_inner(persistent: bool, tls: Option<bool>) -> RedisServer {
        let port = free_ports(1)[0];
        let dir =
            std::env::temp_dir().join(format!("tokengate-redis-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let tls = tls.map(|mutual| TestCa {
            mutual,
            ..TestCa::generate(&dir)
        });
        let mut s = RedisServer {
            port,
            child: None,
            dir,
            persistent,
            tls,
        };
        for _ in 0..5 {
            if s.spawn().await {
                return s;
            }
            s.kill();
            s.port = free_ports(1)[0];
        }
        panic!("redis-server did not start (5 ports tried)");
    }

    /// `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The private CA of a [`RedisServer::start_tls`] server.
    pub fn ca(&self) -> &TestCa {
        self.tls.as_ref().expect("a TLS redis-server")
    }

    /// Runs `redis-cli` against this server (over TLS, trusting its CA, when it is a TLS one):
    /// an independent client to look at what tokengate stored. Its stdout (`--raw`).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = cli_command(self.port, self.tls.as_ref())
            .arg("--raw")
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts redis-server on `self.port`; whether it answers.
    async fn spawn(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            Some(ca) => ca.server_args(&mut cmd, self.port),
            None => {
                cmd.arg("--port").arg(self.port.to_string());
            }
        }
        cmd.arg("--bind")
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
        let mut child = cmd
            .spawn()
            .expect("redis-server runs (scripts/test.sh installs it)");
        let up = answers(&mut child, self.port, self.tls.as_ref()).await;
        self.child = Some(child);
        up
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
        assert!(
            self.spawn().await,
            "redis-server did not start again on port {}",
            self.port
        );
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
    tls: Option<TestCa>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        Self::start_inner(false).await
    }

    /// TLS only, for clients and between the nodes (`--tls-cluster yes`), with a private CA
    /// ([`RedisCluster::ca`]).
    pub async fn start_tls() -> RedisCluster {
        Self::start_inner(true).await
    }

    /// The private CA of a [`RedisCluster::start_tls`] cluster.
    pub fn ca(&self) -> &TestCa {
        self.tls.as_ref().expect("a TLS cluster")
    }

    async fn start_inner(tls: bool) -> RedisCluster {
        let pid = std::process::id();
        let first = free_ports(1)[0];
        let dir = std::env::temp_dir().join(format!("tokengate-redis-cluster-{pid}-{first}"));
        let _ = std::fs::create_dir_all(&dir);
        let tls = tls.then(|| TestCa::generate(&dir));
        let mut cluster = RedisCluster {
            ports: Vec::new(),
            children: Vec::new(),
            dir,
            tls,
        };
        for _ in 0..5 {
            if cluster.spawn_nodes().await {
                return cluster.create().await;
            }
            for c in &mut cluster.children {
                let _ = c.kill();
                let _ = c.wait();
            }
            cluster.children.clear();
        }
        panic!("the cluster nodes did not start (5 sets of ports tried)");
    }

    /// Three nodes on fresh ports (each with its own bus port); whether all answer.
    async fn spawn_nodes(&mut self) -> bool {
        let ports = free_ports(6);
        let (ports, bus) = ports.split_at(3);
        self.ports = ports.to_vec();
        for (p, bus) in ports.iter().zip(bus) {
            let mut cmd = Command::new("redis-server");
            match &self.tls {
                Some(ca) => {
                    ca.server_args(&mut cmd, *p);
                    cmd.args(["--tls-cluster", "yes"]);
                }
                None => {
                    cmd.arg("--port").arg(p.to_string());
                }
            }
            let child = cmd
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--dir")
                .arg(&self.dir)
                .arg("--cluster-enabled")
                .arg("yes")
                // The bus port defaults to port + 10000, which may not exist for a random port.
                .arg("--cluster-port")
                .arg(bus.to_string())
                .arg("--cluster-config-file")
                .arg(self.dir.join(format!("nodes-{p}.conf")))
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs");
            self.children.push(child);
        }
        for (i, p) in ports.iter().enumerate() {
            if !answers(&mut self.children[i], *p, self.tls.as_ref()).await {
                return false;
            }
        }
        true
    }

    /// Joins the three running nodes into one cluster and waits for `cluster_state:ok`.
    async fn create(self) -> RedisCluster {
        let ports = self.ports.clone();
        let mut create = cli_command(ports[0], self.tls.as_ref());
        create.arg("--cluster").arg("create");
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for _ in 0..400 {
            if ports.iter().all(|p| cluster_ok(*p, self.tls.as_ref())) {
                return self;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the cluster did not reach cluster_state:ok");
    }

    /// Runs `redis-cli` against the node on `port` (over TLS for a TLS cluster); its stdout.
    pub fn cli_on(&self, port: u16, args: &[&str]) -> String {
        let out = cli_command(port, self.tls.as_ref())
            .arg("--raw")
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every node, comma-separated: the `session.redis_url` form for a Redis Cluster.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn cluster_ok(port: u16, tls: Option<&TestCa>) -> bool {
    cli_command(port, tls)
        .args(["cluster", "info"])
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
