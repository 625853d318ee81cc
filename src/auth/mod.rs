//! Authentication of CPH API callers: AK/SK requests signed as the official
//! SDKs sign them ([`signing`]), IAM-compatible tokens and passwords ([`token`]),
//! and the 401 answer of a failure ([`error`]).

pub mod error;
pub mod signing;
pub mod token;
