//! One integration binary: black-box tests of tokengate served on 127.0.0.1:0 against a controllable
//! fake IdP and an echo API (hostile and negative paths). One module per stage of the request flow.
mod helpers;

mod harness;
mod hostile_1_50;
mod hostile_51_100;

mod callback;
mod config;
mod core_gaps;
mod csrf;
mod dpop;
mod login;
mod logout;
mod oidc_dpop;
mod oidc_provider;
mod oidc_route_tokens;
mod oidc_token_exchange;
mod operations;
mod par;
mod proxy;
mod redis_cache;
mod redis_gaps;
mod redis_server;
mod redis_tls;
mod refresh;
mod replicas;
mod route_tokens;
mod session;
mod store_redis;
