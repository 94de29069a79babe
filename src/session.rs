//! Sessions: what they hold ([`tokens`]), how they are sealed ([`seal`]) and carried in cookies
//! ([`cookie`]), where they live ([`store`]; with Redis, [`store_redis`] and a replica's own
//! [`redis_cache`]), the checks in front of them ([`extract`]), and
//! token refresh ([`refresh`]) and per-route tokens ([`route_token`]).

pub mod cookie;
pub mod extract;
pub mod redis_cache;
pub mod refresh;
pub mod route_token;
pub mod seal;
pub mod store;
pub mod store_redis;
pub mod tokens;

pub use tokens::Session;
