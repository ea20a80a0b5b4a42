use clap::Parser;
use localship_provisioner::cli::Args;
use localship_provisioner::startup;

fn main() -> anyhow::Result<()> {
    localship_heap::one_arena();
    tokio::runtime::Runtime::new()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let args = Args::parse();
    startup::init_logging(args.log_format);
    let client = startup::client().await?;
    localship_provisioner::run::run(args, client).await?;
    Ok(())
}
