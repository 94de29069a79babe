//! Server-side sessions in Redis, shared by every replica.
//!
//! Keys (the `{sid}` hash tag keeps one session's keys in one cluster slot):
//! - `tg:{sid}:s` — hash `g` (generation) + `d` (the session, sealed with the session keys and the
//!   key name as associated data); TTL = idle timeout, capped by the absolute deadline;
//! - `tg:{sid}:lease` — the refresh lease (`SET NX PX`, owner token, compare-and-delete release);
//! - `tg:sub:<sub>`, `tg:isid:<idp sid>` — sets of session ids for back-channel logout;
//! - `tg:jti:<jti>` — logout-token ids already used (replay protection);
//! - `tg:state:<sha256(state)>` — login states already consumed (single use across replicas).
//!
//! TLS (`rediss://`) checks the server against the webpki roots, or only against the CAs of
//! `session.redis_ca_file` when set. Every call has a timeout; an unreachable (or untrusted)
//! Redis gives `StoreError::Unavailable` (503), never a hang or a panic, and the connection
//! manager reconnects by itself.
//!
//! The read every API call makes goes over connections of our own ([`pipe`]: the crate's cost
//! a third of a proxied call) when the server is a plain-TCP standalone one; everything else
//! (writes, scripts, TLS, clusters, the invalidation subscription) through the crate.

use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, Script};

mod pipe;

use super::redis_cache::{self, LocalSessions, Lookup};
use super::refresh::{grant, grant_for, RefreshError};
use super::seal::Sealer;
use super::store::{Downscoped, OpenedCache, StoreError};
use super::tokens::Session;
use crate::idp::{Idp, IdpError, TokenTarget};

/// How long one Redis call may take before the request gets a 503.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a refresh lease lives if its holder dies.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// How long a request waits for another replica's refresh before answering 503.
const LEASE_WAIT: Duration = Duration::from_secs(20);
const LEASE_POLL: Duration = Duration::from_millis(25);

/// Compare-and-swap write of a session. Every write (and [`DELETE`]) announces the session id on
/// [`redis_cache::CHANNEL`] in the same script, so replicas that keep sessions
/// (`session.redis_cache_ms`) drop their copy; `pcall`: a Redis user without the right to
/// publish still writes (such replicas then keep nothing: they cannot subscribe either).
const CAS: &str = r"
local cur = redis.call('HGET', KEYS[1], 'g')
if (cur == false and ARGV[1] == '0') or cur == ARGV[1] then
  redis.call('HSET', KEYS[1], 'g', ARGV[2], 'd', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.pcall('PUBLISH', ARGV[5], ARGV[6])
  return 1
end
return 0
";

/// Deletes a session and announces it, atomically (see [`CAS`]).
const DELETE: &str = r"
local n = redis.call('DEL', KEYS[1])
redis.pcall('PUBLISH', ARGV[1], ARGV[2])
return n
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// One value per thread, for connections: the binary's workers each run their own event loop,
/// and a connection's I/O (and the `redis` crate's driver task) belongs to the loop that made it.
struct PerThread<T>(std::sync::Mutex<Vec<(std::thread::ThreadId, T)>>);

impl<T> Default for PerThread<T> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }
}

impl<T: Clone> PerThread<T> {
    fn all(&self) -> std::sync::MutexGuard<'_, Vec<(std::thread::ThreadId, T)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This thread's value.
    fn get(&self) -> Option<T> {
        let me = std::thread::current().id();
        self.all()
            .iter()
            .find(|(t, _)| *t == me)
            .map(|(_, v)| v.clone())
    }

    /// Sets this thread's value.
    fn set(&self, v: T) {
        let me = std::thread::current().id();
        let mut all = self.all();
        all.retain(|(t, _)| *t != me);
        all.push((me, v));
    }

    /// Drops the values `gone` says are gone.
    fn remove(&self, gone: impl Fn(&T) -> bool) {
        self.all().retain(|(_, v)| !gone(v));
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The Redis session backend.
pub struct RedisStore {
    target: Target,
    /// The crate's connection of each thread that calls Redis. Shared by all, its driver task
    /// ran on one worker's event loop and every call from the other workers crossed threads
    /// twice (the command to the driver, the answer back): measured, 5 thread wake-ups per call
    /// at one connection, 3 with a connection per thread (the third is the answer's).
    conns: PerThread<Conn>,
    /// Held while connecting, so that concurrent first calls make one connection.
    connecting: tokio::sync::Mutex<()>,
    /// The per-call session read over connections of our own (a plain-TCP server), `None`: the
    /// crate reads ([`pipe`] says why).
    reads: Option<pipe::Reads>,
    sealer: Sealer,
    /// Sessions already opened, by their sealed value as stored: without `local`, every call
    /// still reads the session from Redis (one round trip: a session deleted or changed by
    /// another replica is seen at once), but the same stored bytes are decrypted and parsed only
    /// once.
    opened: OpenedCache,
    /// Sessions served without a round trip (`session.redis_cache_ms` > 0), kept correct by
    /// invalidation messages ([`redis_cache`]); `None`: every call reads Redis.
    local: Option<Arc<LocalSessions>>,
    /// One client per configured node, for the invalidation subscription.
    subscribe_via: Vec<redis::Client>,
    cas: Script,
    delete: Script,
    release: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisStore")
    }
}

#[derive(Clone)]
enum Target {
    /// One URL: a standalone server, or one node of a cluster (found out at connect time, and
    /// then the rest of the cluster is discovered from it).
    Single {
        client: redis::Client,
        url: String,
        certs: Option<redis::TlsCertificates>,
    },
    Cluster(redis::cluster::ClusterClient),
}

fn cluster_client(
    urls: Vec<String>,
    certs: Option<redis::TlsCertificates>,
) -> redis::RedisResult<redis::cluster::ClusterClient> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(urls)
        .connection_timeout(CALL_TIMEOUT)
        .response_timeout(CALL_TIMEOUT);
    if let Some(certs) = certs {
        builder = builder.certs(certs);
    }
    builder.build()
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Every Redis call is bounded by [`CALL_TIMEOUT`]: a slow Redis is an error, never a hang.
async fn bounded<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| unavailable("call timed out"))?
        .map_err(unavailable)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn session_key(sid: &str) -> String {
    // Built by hand: made on every call, and `format!` costs more than the copies.
    let mut key = String::with_capacity(sid.len() + 6);
    key.push_str("tg:{");
    key.push_str(sid);
    key.push_str("}:s");
    key
}

fn lease_key(sid: &str) -> String {
    format!("tg:{{{sid}}}:lease")
}

fn index_keys(s: &Session) -> Vec<String> {
    let mut keys = vec![format!("tg:sub:{}", s.subject)];
    if let Some(isid) = &s.idp_session_id {
        keys.push(format!("tg:isid:{isid}"));
    }
    keys
}

impl RedisStore {
    /// `url`: `redis://` or `rediss://` (TLS, the server checked against the webpki roots);
    /// several comma-separated URLs: a Redis Cluster; one URL of a cluster node (it answers
    /// `cluster_enabled:1` to `INFO cluster` at connect time) is a cluster seed too.
    /// Connecting happens in the background: tokengate starts while Redis is down.
    pub fn new(url: &str, sealer: Sealer) -> anyhow::Result<Arc<Self>> {
        Self::with_tls(url, None, None, sealer, None)
    }

    /// As [`Self::new`]; with `ca_pem` (PEM CA certificates, `session.redis_ca_file`) a
    /// `rediss://` server must present a certificate chaining to one of those, and to nothing
    /// else: the webpki roots are not trusted then (a private CA stays private). With `client`
    /// (`session.redis_client_cert_file` / `_key_file`) tokengate presents that certificate to
    /// servers that require one (mutual TLS). `local`: this replica's session cache
    /// (`session.redis_cache_ms`), if any.
    pub fn with_tls(
        url: &str,
        ca_pem: Option<&[u8]>,
        client: Option<&crate::config::RedisClientTls>,
        sealer: Sealer,
        local: Option<Arc<LocalSessions>>,
    ) -> anyhow::Result<Arc<Self>> {
        let urls: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let certs = (ca_pem.is_some() || client.is_some()).then(|| redis::TlsCertificates {
            client_tls: client.map(|c| redis::ClientTlsConfig {
                client_cert: c.cert_pem.clone(),
                client_key: c.key_pem.clone(),
            }),
            root_cert: ca_pem.map(<[u8]>::to_vec),
        });
        // One client per node: the invalidation subscription's, and the one of a single URL.
        let subscribe_via = urls
            .iter()
            .map(|u| match &certs {
                Some(c) => redis::Client::build_with_tls(*u, c.clone()),
                None => redis::Client::open(*u),
            })
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let target = match (&urls[..], &subscribe_via[..]) {
            ([url], [client]) => Target::Single {
                client: client.clone(),
                url: url.to_string(),
                certs,
            },
            ([], _) => anyhow::bail!("session.redis_url: no URL"),
            _ => Target::Cluster(cluster_client(
                urls.iter().map(|u| u.to_string()).collect(),
                certs,
            )?),
        };
        let reads = match &target {
            Target::Single { client, .. } => pipe::Reads::new(client.get_connection_info()),
            Target::Cluster(_) => None,
        };
        Ok(Arc::new(Self {
            reads,
            target,
            conns: PerThread::default(),
            connecting: tokio::sync::Mutex::new(()),
            sealer,
            opened: OpenedCache::default(),
            local,
            subscribe_via,
            cas: Script::new(CAS),
            delete: Script::new(DELETE),
            release: Script::new(RELEASE),
        }))
    }

    /// This thread's connection, connecting first if needed (bounded by [`CALL_TIMEOUT`]).
    async fn conn(&self) -> Result<Conn, StoreError> {
        if let Some(c) = self.conns.get() {
            return Ok(c);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(c) = self.conns.get() {
            return Ok(c);
        }
        let connect = async {
            match &self.target {
                Target::Single { client, url, certs } => {
                    // A cluster node answers `cluster_enabled:1`: the one URL is then a seed.
                    // A server that refuses INFO (an ACL, a proxy) is taken as standalone.
                    let mut probe = client.get_multiplexed_async_connection().await?;
                    let info: String = match redis::cmd("INFO")
                        .arg("cluster")
                        .query_async(&mut probe)
                        .await
                    {
                        Ok(info) => info,
                        Err(e)
                            if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() =>
                        {
                            return Err(e)
                        }
                        Err(_) => String::new(),
                    };
                    drop(probe);
                    if info.contains("cluster_enabled:1") {
                        let cluster = cluster_client(vec![url.clone()], certs.clone())?;
                        return cluster.get_async_connection().await.map(Conn::Cluster);
                    }
                    let cfg = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(CALL_TIMEOUT)
                        .set_response_timeout(CALL_TIMEOUT)
                        .set_number_of_retries(1)
                        .set_max_delay(200);
                    ConnectionManager::new_with_config(client.clone(), cfg)
                        .await
                        .map(Conn::Single)
                }
                Target::Cluster(c) => c.get_async_connection().await.map(Conn::Cluster),
            }
        };
        let c = tokio::time::timeout(CALL_TIMEOUT, connect)
            .await
            .map_err(|_| unavailable("connect timed out"))?
            .map_err(unavailable)?;
        self.conns.set(c.clone());
        Ok(c)
    }

    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let conn = self.conn().await?;
        bounded(async {
            match conn {
                Conn::Single(mut c) => cmd.query_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<T>(&mut c).await,
            }
        })
        .await
    }

    async fn invoke<T: FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let conn = self.conn().await?;
        bounded(async {
            match conn {
                Conn::Single(mut c) => inv.invoke_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async::<T>(&mut c).await,
            }
        })
        .await
    }

    pub async fn ping(&self) -> bool {
        if let Some(local) = &self.local {
            // Readiness checks come first: the subscription is up before the first session call.
            local.follow(&self.subscribe_via);
        }
        self.query::<String>(&redis::cmd("PING")).await.is_ok()
    }

    /// The session `sid`, or `None` when it does not exist (expired, logged out, revoked): this
    /// replica's copy when it keeps one ([`redis_cache`]), else read from Redis.
    pub async fn get(&self, sid: &str) -> Result<Option<Arc<Session>>, StoreError> {
        let Some(local) = &self.local else {
            return self.read_shared(sid).await;
        };
        local.follow(&self.subscribe_via);
        let ticket = match local.lookup(sid) {
            Lookup::Hit(s) => return Ok(Some(s)),
            Lookup::Miss(t) => Some(t),
            Lookup::Off => None,
        };
        let read = self.read_shared(sid).await?;
        if let (Some(t), Some(s)) = (ticket, &read) {
            local.fill(t, s);
        }
        Ok(read)
    }

    /// The session `sid` as stored in Redis now (one round trip), or `None`: a copy to change.
    pub async fn read(&self, sid: &str) -> Result<Option<Session>, StoreError> {
        Ok(self.read_shared(sid).await?.map(Arc::unwrap_or_clone))
    }

    /// As [`Self::read`], shared with the cache of opened values: the same stored value is
    /// decrypted and parsed once, and not copied per call.
    async fn read_shared(&self, sid: &str) -> Result<Option<Arc<Session>>, StoreError> {
        let key = session_key(sid);
        // The sealed value as bytes: it is base64 (checked by `open`), so checking it as UTF-8
        // first would only cost a pass over it.
        let (generation, data): (Option<u64>, Option<Vec<u8>>) = match self.fast_read(&key).await? {
            Some(read) => read,
            None => {
                self.query(redis::cmd("HMGET").arg(&key).arg("g").arg("d"))
                    .await?
            }
        };
        let (Some(generation), Some(data)) = (generation, data) else {
            return Ok(None);
        };
        let s = match self.opened.get(&data) {
            Some(s) => s,
            None => {
                let Some(plain) = self.sealer.open(key.as_bytes(), &data) else {
                    return Ok(None);
                };
                let Ok(s) = serde_json::from_slice::<Session>(&plain) else {
                    return Ok(None);
                };
                let s = Arc::new(s);
                self.opened.put(&data, &s);
                s
            }
        };
        if s.id != sid {
            return Ok(None);
        }
        // A write seals its new generation into the value it stores, so the two agree unless
        // the hash was changed by hand: then the stored `g` is what the next write must match.
        if s.generation == generation {
            return Ok(Some(s));
        }
        let mut s = Arc::unwrap_or_clone(s);
        s.generation = generation;
        Ok(Some(Arc::new(s)))
    }

    /// `HMGET key g d` over [`pipe`]'s connections; `None` when they do not serve this server
    /// (then the crate reads).
    async fn fast_read(
        &self,
        key: &str,
    ) -> Result<Option<(Option<u64>, Option<Vec<u8>>)>, StoreError> {
        let Some(reads) = self.reads.as_ref().filter(|r| r.on()) else {
            return Ok(None);
        };
        match reads
            .hmget(key.as_bytes(), &[b"g", b"d"], CALL_TIMEOUT)
            .await
        {
            Ok(mut fields) => {
                let data = fields.pop().flatten();
                let generation = match fields.pop().flatten() {
                    None => None,
                    Some(g) => Some(
                        std::str::from_utf8(&g)
                            .ok()
                            .and_then(|g| g.parse::<u64>().ok())
                            .ok_or_else(|| unavailable("the stored generation is not a number"))?,
                    ),
                };
                Ok(Some((generation, data)))
            }
            Err(pipe::ReadError::NotHere) => Ok(None),
            Err(pipe::ReadError::Unavailable(e)) => Err(unavailable(e)),
        }
    }

    /// Compare-and-swap write: succeeds only if the stored generation is still
    /// `session.generation` (0: the session must not exist yet); then advances it.
    pub async fn put(
        &self,
        session: &mut Session,
        idle: Duration,
        absolute: Duration,
    ) -> Result<(), StoreError> {
        let key = session_key(&session.id);
        // In milliseconds: whole seconds would let the key outlive the absolute deadline by up
        // to a second. Relative (PEXPIRE), so a clock difference between this host and Redis's
        // does not move it; only the write's latency does.
        let left_ms = session
            .absolute_deadline(absolute)
            .saturating_mul(1000)
            .saturating_sub(now_ms());
        let ttl_ms = u64::try_from(idle.as_millis())
            .unwrap_or(u64::MAX)
            .min(left_ms)
            .max(1);
        let next = session.generation + 1;
        let mut stored = session.clone();
        stored.generation = next;
        let plain = serde_json::to_vec(&stored).map_err(|_| StoreError::TooLarge)?;
        let sealed = self.sealer.seal(key.as_bytes(), &plain);
        let mut inv = self.cas.key(&key);
        inv.arg(session.generation)
            .arg(next)
            .arg(&sealed)
            .arg(ttl_ms)
            .arg(redis_cache::CHANNEL)
            .arg(&session.id);
        let written = self.invoke::<i64>(inv).await;
        if let Some(local) = &self.local {
            // Also after a conflict or a failure: whatever this replica kept may be old.
            local.invalidate(&session.id);
        }
        if written? != 1 {
            return Err(StoreError::Conflict);
        }
        if session.generation == 0 {
            // Indexes for back-channel logout (best effort: a miss only means that logout
            // falls back to the session's own expiry).
            for idx in index_keys(session) {
                let r = async {
                    self.query::<i64>(redis::cmd("SADD").arg(&idx).arg(&session.id))
                        .await?;
                    self.query::<i64>(
                        redis::cmd("EXPIRE")
                            .arg(&idx)
                            .arg(absolute.as_secs().max(1)),
                    )
                    .await
                }
                .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "could not index the session");
                }
            }
        }
        session.generation = next;
        Ok(())
    }

    pub async fn delete(&self, session: &Session) -> Result<(), StoreError> {
        self.opened.forget(&session.id);
        let key = session_key(&session.id);
        let mut inv = self.delete.key(&key);
        inv.arg(redis_cache::CHANNEL).arg(&session.id);
        let deleted = self.invoke::<i64>(inv).await;
        if let Some(local) = &self.local {
            local.invalidate(&session.id);
        }
        deleted?;
        for idx in index_keys(session) {
            let _ = self
                .query::<i64>(redis::cmd("SREM").arg(idx).arg(&session.id))
                .await;
        }
        Ok(())
    }

    /// Deletes every session indexed under `sub` and/or the IdP session id `isid`
    /// (back-channel logout). Returns how many were deleted.
    pub async fn delete_matching(
        &self,
        sub: Option<&str>,
        isid: Option<&str>,
    ) -> Result<usize, StoreError> {
        // OIDC Back-Channel Logout §2.7: with a sid, only that IdP session's RP sessions end.
        let index = match (isid, sub) {
            (Some(isid), _) => format!("tg:isid:{isid}"),
            (None, Some(sub)) => format!("tg:sub:{sub}"),
            (None, None) => return Ok(0),
        };
        let sids: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(&index)).await?;
        let mut n = 0;
        for sid in &sids {
            match self.read(sid).await? {
                // With both sid and sub given, both must match; others stay indexed.
                Some(s) if sub.is_some_and(|sub| sub != s.subject) => {}
                // delete() also takes it out of its indexes.
                Some(s) => {
                    self.delete(&s).await?;
                    n += 1;
                }
                // Expired meanwhile: only the index entry is left to drop.
                None => {
                    let _ = self
                        .query::<i64>(redis::cmd("SREM").arg(&index).arg(sid))
                        .await;
                }
            }
        }
        Ok(n)
    }

    /// Records a logout token's `jti`; false if it was seen before (a replay).
    pub async fn first_jti(&self, jti: &str, ttl: Duration) -> Result<bool, StoreError> {
        let r: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(format!("tg:jti:{jti}"))
                    .arg(1)
                    .arg("NX")
                    .arg("EX")
                    .arg(ttl.as_secs().max(1)),
            )
            .await?;
        Ok(r.is_some())
    }

    /// Records a login `state` as consumed (hashed); false if another replica consumed it first.
    pub async fn first_state_use(&self, state: &str, ttl: Duration) -> Result<bool, StoreError> {
        use sha2::{Digest, Sha256};
        let h: String = Sha256::digest(state.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let r: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(format!("tg:state:{h}"))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
            )
            .await?;
        Ok(r.is_some())
    }

    /// Takes the refresh lease of session `sid` for `owner` (a random token) unless someone holds
    /// it; true when taken. Public for tests; [`Self::refresh_coordinated`] is the user.
    pub async fn try_lease(&self, sid: &str, owner: &str) -> Result<bool, StoreError> {
        let r: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(lease_key(sid))
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE_TTL.as_millis() as u64),
            )
            .await?;
        Ok(r.is_some())
    }

    /// Releases the lease if `owner` still holds it (compare-and-delete in one script): a holder
    /// whose lease expired and was taken by another replica must not delete that one's lease.
    /// True when it was released.
    pub async fn release_lease(&self, sid: &str, owner: &str) -> Result<bool, StoreError> {
        let mut inv = self.release.key(lease_key(sid));
        inv.arg(owner);
        Ok(self.invoke::<i64>(inv).await? == 1)
    }

    /// Runs `work` if this owner gets the session's refresh lease (`None` when another holds
    /// it), releasing the lease afterwards; an unreleased lease expires by itself.
    async fn while_leased<T>(
        &self,
        sid: &str,
        owner: &str,
        work: impl std::future::Future<Output = T>,
    ) -> Result<Option<T>, RefreshError> {
        if !self.try_lease(sid, owner).await.map_err(store_down)? {
            return Ok(None);
        }
        let result = work.await;
        if let Err(e) = self.release_lease(sid, owner).await {
            tracing::warn!(error = %e, "could not release the refresh lease");
        }
        Ok(Some(result))
    }

    /// One refresh grant for the session across all replicas: the holder of the lease refreshes
    /// (after re-reading the session: another replica may have done it already) and writes with
    /// compare-and-swap; the others wait for the new generation and use it.
    pub async fn refresh_coordinated(
        &self,
        idp: &Idp,
        session: &Session,
        idle: Duration,
        absolute: Duration,
    ) -> Result<Session, RefreshError> {
        let owner = new_lease_owner();
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        loop {
            if let Some(result) = self
                .while_leased(
                    &session.id,
                    &owner,
                    self.refresh_holding_lease(idp, session, idle, absolute),
                )
                .await?
            {
                return result;
            }
            // Someone else is refreshing: wait for their write.
            tokio::time::sleep(LEASE_POLL).await;
            match self.read(&session.id).await.map_err(store_down)? {
                Some(current) if current.access_token.secret() != session.access_token.secret() => {
                    return Ok(current)
                }
                Some(_) => {}
                None => return Err(RefreshError::Fatal("the session ended".into())),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RefreshError::Transient(IdpError::Timeout));
            }
        }
    }

    /// A downscoped refresh grant (RFC 8707 §2.2) under the session's refresh lease, so that it
    /// never spends a refresh token another replica is rotating; a rotated refresh token is
    /// written back (compare-and-swap, re-applied on a concurrent write).
    pub async fn downscope_coordinated(
        &self,
        idp: &Idp,
        session: &Session,
        target: &TokenTarget,
        idle: Duration,
        absolute: Duration,
    ) -> Result<Downscoped, RefreshError> {
        let owner = new_lease_owner();
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        loop {
            if let Some(result) = self
                .while_leased(
                    &session.id,
                    &owner,
                    self.downscope_holding_lease(idp, &session.id, target, idle, absolute),
                )
                .await?
            {
                return result;
            }
            tokio::time::sleep(LEASE_POLL).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(RefreshError::Transient(IdpError::Timeout));
            }
        }
    }

    async fn downscope_holding_lease(
        &self,
        idp: &Idp,
        sid: &str,
        target: &TokenTarget,
        idle: Duration,
        absolute: Duration,
    ) -> Result<Downscoped, RefreshError> {
        let ended = || RefreshError::Fatal("the session ended".into());
        // The stored session holds the newest refresh token (another replica may have rotated it).
        let mut current = self
            .read(sid)
            .await
            .map_err(store_down)?
            .ok_or_else(ended)?;
        let token = match grant_for(idp, &current, target).await {
            Ok(t) => t,
            Err(e @ RefreshError::Fatal(_)) => {
                let _ = self.delete(&current).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let Some(new_rt) = token.refresh_token.clone() else {
            return Ok(Downscoped {
                token,
                rotated: None,
            });
        };
        if current
            .refresh_token
            .as_ref()
            .is_some_and(|old| old.secret() == new_rt.secret())
        {
            return Ok(Downscoped {
                token,
                rotated: None,
            });
        }
        // The old refresh token is spent: the new one must be stored, even if a request touched
        // the session meanwhile (only the lease holder changes tokens, so re-applying is safe).
        for _ in 0..5 {
            current.refresh_token = Some(new_rt.clone());
            match self.put(&mut current, idle, absolute).await {
                Ok(()) => {
                    return Ok(Downscoped {
                        token,
                        rotated: Some(current),
                    })
                }
                Err(StoreError::Conflict) => {
                    current = self
                        .read(sid)
                        .await
                        .map_err(store_down)?
                        .ok_or_else(ended)?;
                }
                Err(e) => return Err(store_down(e)),
            }
        }
        Err(store_down(StoreError::Conflict))
    }

    async fn refresh_holding_lease(
        &self,
        idp: &Idp,
        seen: &Session,
        idle: Duration,
        absolute: Duration,
    ) -> Result<Session, RefreshError> {
        let Some(current) = self.read(&seen.id).await.map_err(store_down)? else {
            return Err(RefreshError::Fatal("the session ended".into()));
        };
        // Refreshed by another replica since this request read it: nothing to do.
        if current.access_token.secret() != seen.access_token.secret() {
            return Ok(current);
        }
        let mut next = match grant(idp, &current).await {
            Ok(n) => n,
            Err(e @ RefreshError::Fatal(_)) => {
                let _ = self.delete(&current).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        // The new refresh token must be stored before anyone can be answered with it.
        match self.put(&mut next, idle, absolute).await {
            Ok(()) => Ok(next),
            Err(StoreError::Conflict) => self
                .read(&seen.id)
                .await
                .map_err(store_down)?
                .ok_or_else(|| RefreshError::Fatal("the session ended".into())),
            Err(e) => Err(store_down(e)),
        }
    }
}

/// A session-store failure during a refresh: transient (the session is kept).
fn store_down(e: StoreError) -> RefreshError {
    RefreshError::Transient(IdpError::Transport(format!("session store: {e}")))
}

/// A random owner token for the refresh lease (128 bits, hex).
fn new_lease_owner() -> String {
    let mut owner = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut owner);
    owner.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_sees_its_own_value() {
        let values = Arc::new(PerThread::default());
        values.set(1);
        values.set(2);
        let other = Arc::clone(&values);
        let seen = std::thread::spawn(move || {
            let before = other.get();
            other.set(7);
            (before, other.get())
        })
        .join()
        .expect("thread");
        assert_eq!(seen, (None, Some(7)));
        assert_eq!(values.get(), Some(2), "replaced, not added");
        values.remove(|v| *v == 2);
        assert_eq!(values.get(), None);
        assert_eq!(values.all().len(), 1, "the other thread's stays");
    }

    #[test]
    fn a_session_key_keeps_the_id_in_one_cluster_slot() {
        assert_eq!(session_key("abc-_9"), "tg:{abc-_9}:s");
        assert_eq!(session_key(""), "tg:{}:s");
        assert_eq!(lease_key("abc"), "tg:{abc}:lease");
    }
}
