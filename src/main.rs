fn main() -> anyhow::Result<()> {
    rlsgate::commands::cli::main()
}
