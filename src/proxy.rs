//! The API reverse proxy: [`path`] (one normalisation for matching and forwarding),
//! [`headers`] (pure header rules), [`added`] (the fields they set, written straight into the
//! upstream request's head), [`upstream`] (pooled client
//! connections, our own HTTP/1.1 one for calls without a body; URI joining), [`passthrough`] (the
//! answer's fields no rule reads, passed on as they came), [`forward`] (the phases: request
//! filter → upstream request filter → response filter).

pub mod added;
pub mod forward;
pub mod headers;
pub mod passthrough;
pub mod path;
pub mod upstream;
