//! The command line: [`cli`] parses the arguments and hands each command to
//! its own file (`rlsgate check` lives with the check, in `ops`).

pub mod cli;
pub(crate) mod demo;
pub(crate) mod dev_tools;
pub mod init_db;
pub(crate) mod logging;
pub(crate) mod serve;
