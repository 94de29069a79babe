//! The `tokengate` binary: parse the command line, load and validate config (exit 2 on any
//! problem), start logging, bind, and serve until SIGTERM/SIGINT.

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use tokengate::config::Config;

const USAGE: &str = "\
tokengate — a Backend-for-Frontend OAuth token handler

Usage:
  tokengate [--config PATH]          run the service (default config: ./config.toml)
  tokengate check [--config PATH]    validate the config and exit
  tokengate keygen                   print a fresh base64 session key
  tokengate --help | --version

Every config key can be overridden by TOKENGATE_<SECTION>__<KEY>, e.g. TOKENGATE_OAUTH__CLIENT_SECRET.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config_path = "config.toml".to_string();
    let mut command = "run";
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("tokengate {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "-c" | "--config" => {
                let Some(p) = args.get(i + 1) else {
                    eprintln!("--config needs a path\n\n{USAGE}");
                    return ExitCode::from(2);
                };
                config_path = p.clone();
                i += 1;
            }
            "check" if i == 0 => command = "check",
            "keygen" if i == 0 => command = "keygen",
            other => {
                eprintln!("unknown argument `{other}`\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
        i += 1;
    }
    if command == "keygen" {
        println!("{}", tokengate::generate_key());
        return ExitCode::SUCCESS;
    }
    let config = match Config::load_file(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tokengate: {config_path}: {e}");
            return ExitCode::from(2);
        }
    };
    if command == "check" {
        let recs = config.recommendations();
        for r in &recs {
            println!("warning: {r}");
        }
        println!(
            "{config_path}: configuration is valid ({} warning{})",
            recs.len(),
            if recs.len() == 1 { "" } else { "s" }
        );
        return ExitCode::SUCCESS;
    }
    tokengate::telemetry::init(&config.log);
    let listener = match std::net::TcpListener::bind(config.server.listen) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.server.listen, error = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(listen = %bound, public_url = %config.server.public_url, "listening");
    match tokengate::serve_on_threads(listener, config, shutdown_signal()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: finishing in-flight requests");
}
