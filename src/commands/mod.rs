//! The command line and the commands besides serving.

pub mod cli;
pub(crate) mod demo;
pub(crate) mod dev_tools;
pub mod init_db;
pub(crate) mod logging;
pub(crate) mod serve;
