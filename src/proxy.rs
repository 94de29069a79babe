//! The API reverse proxy: [`path`] (one normalisation for matching and forwarding),
//! [`headers`] (pure header rules), [`upstream`] (pooled client, URI joining), [`forward`] (the
//! phases: request filter → upstream request filter → response filter).

pub mod forward;
pub mod headers;
pub mod path;
pub mod upstream;
