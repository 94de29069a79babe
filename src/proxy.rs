//! The API reverse proxy: [`path`] (one normalisation for matching and forwarding),
//! [`headers`] (pure header rules), [`upstream`] (pooled client
//! connections, our own HTTP/1.1 one for calls without a body; URI joining), [`forward`] (the
//! phases: request filter → upstream request filter → response filter).

pub mod forward;
pub mod headers;
pub mod path;
pub mod upstream;
