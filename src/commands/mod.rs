//! The command line and the commands besides serving.

pub mod cli;
pub mod demo;
pub mod dev_tools;
pub mod init_db;
pub mod logging;
pub mod serve;
