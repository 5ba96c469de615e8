fn main() -> anyhow::Result<()> {
    rlsgate::cli::main()
}
