//! The browser-facing endpoints, in the order a user meets them: [`login`] → IdP →
//! [`callback`] → [`userinfo`] / [`refresh`] → [`logout`].

pub mod backchannel;
pub mod callback;
pub mod ledger;
pub mod login;
pub mod logout;
pub mod refresh;
pub mod return_to;
pub mod userinfo;

use std::collections::HashMap;

use crate::error::ApiError;

/// Query parameters, parsed once. A parameter named in `single` that appears twice is refused
/// (never "last wins": two `state`s or `code`s are an attack or a bug, RFC 6749 §3.1).
pub struct QueryParams(HashMap<String, String>);

impl QueryParams {
    pub fn parse(query: Option<&str>, single: &[&str]) -> Result<Self, ApiError> {
        let mut map: HashMap<String, String> = HashMap::new();
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if map.contains_key(k.as_ref()) && single.contains(&k.as_ref()) {
                return Err(ApiError::invalid_request(format!(
                    "the `{}` parameter must not be repeated",
                    k.escape_default()
                )));
            }
            map.entry(k.into_owned()).or_insert_with(|| v.into_owned());
        }
        Ok(Self(map))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}
