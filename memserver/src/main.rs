//! `farpool-memserver`: serve memory (default) or `admin` a running server. See `--help`.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use farpool_memserver::cli::{AdminArgs, Cli, Command, ServeArgs};
use farpool_memserver::{Server, admin_request, format_outcome};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Admin(a)) => admin(a),
        Some(Command::Topology) => {
            println!("{}", farpool_cxl::Topology::discover().context("discovering the memory topology")?);
            Ok(())
        }
        None => serve(cli.serve),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (cfg, log) = args.resolve()?;
    let filter = tracing_subscriber::EnvFilter::try_new(&log).with_context(|| format!("invalid --log {log:?}"))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let grace = cfg.shutdown_grace;
    // Handlers go in before the server starts, so that an early SIGTERM is a clean shutdown, not a kill.
    let signals = Signals::install()?;
    let server = Server::start(cfg).context("starting the memory server")?;
    // A stable, machine-readable line for scripts and tests (the log line on stderr may change).
    println!("listening on {}", server.local_addr());
    let signal = signals.wait();
    tracing::info!("{signal} received");
    server.shutdown(grace);
    server.join()?;
    Ok(())
}

/// SIGTERM and SIGINT handlers on a small runtime of their own.
struct Signals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let _enter = rt.enter();
        let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        drop(_enter);
        Ok(Self { rt, term, int })
    }

    /// Block until SIGTERM or SIGINT; returns its name.
    fn wait(mut self) -> &'static str {
        self.rt.block_on(async {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        })
    }
}

fn admin(a: AdminArgs) -> anyhow::Result<()> {
    let outcome = admin_request(a.server, a.action.to_cmd(), a.timeout)
        .with_context(|| format!("admin command to {}", a.server))?;
    print!("{}", format_outcome(&outcome));
    Ok(())
}
