//! The command line and the commands besides serving.

pub mod cli;
pub mod demo;
pub mod init_db;
