//! What operators see and steer: admin endpoints, metrics, alarms, reload and
//! `rlsgate check`.

pub(crate) mod admin;
pub(crate) mod check;
pub(crate) mod metrics;
pub(crate) mod reload;
pub(crate) mod tamper;
