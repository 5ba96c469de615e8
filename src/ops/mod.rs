//! What operators see and steer: admin endpoints, metrics, alarms, reload and
//! `rlsgate check`.

pub mod admin;
pub mod check;
pub mod metrics;
pub mod reload;
pub mod tamper;
