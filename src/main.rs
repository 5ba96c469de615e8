//! The `rlsgate` binary: the command line is parsed and dispatched by
//! `commands::cli` in the library.

fn main() -> anyhow::Result<()> {
    rlsgate::commands::cli::main()
}
