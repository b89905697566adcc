//! `cspine-triage`: thin command line over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use cspine_triage::cli;
use cspine_triage::config::Config;
use cspine_triage::service::logging;

#[derive(Parser)]
#[command(
    version,
    about = "Cervical-spine fracture triage: DICOM in, MQTT alerts out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: DICOM SCP, series assembly, inference, alert publishing.
    Serve(ServeArgs),
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// TOML config file.
        file: PathBuf,
    },
    /// Generate synthetic cervical-spine CT phantom studies (DICOM + ground truth).
    Synth(cspine_triage::synth::SynthArgs),
    /// Run the triage pipeline offline on DICOM folders or files.
    Infer(cli::infer::InferArgs),
    /// Send DICOM files to a Storage SCP (C-STORE), as a scanner would.
    Send(cli::send::SendArgs),
    /// Subscribe to a daemon's results on an MQTT broker and print them.
    Watch(cli::watch::WatchArgs),
    /// Send a C-ECHO (DICOM Verification) to a DICOM node, over TCP or TLS.
    Echo(cli::echo::EchoArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Our AE title.
    #[arg(long)]
    ae_title: Option<String>,
    /// DICOM port to listen on.
    #[arg(long)]
    port: Option<u16>,
    /// Spool directory for received instances.
    #[arg(long)]
    spool: Option<PathBuf>,
    /// Seconds without a new instance after which a series is complete.
    #[arg(long)]
    quiet_period: Option<f64>,
    /// MQTT broker URL (mqtt:// or mqtts://); without it an embedded broker is started.
    #[arg(long)]
    mqtt: Option<String>,
}

impl ServeArgs {
    fn into_config(self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(ae) = self.ae_title {
            config.dicom.ae_title = ae;
        }
        if let Some(port) = self.port {
            config.dicom.port = port;
        }
        if let Some(spool) = self.spool {
            config.dicom.spool_dir = spool;
        }
        if let Some(q) = self.quiet_period {
            config.series.quiet_period_secs = q;
        }
        if let Some(url) = self.mqtt {
            config.alert.mqtt_url = Some(url);
        }
        config.validate()?;
        Ok(config)
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.into_config()?;
            warn_about(&config);
            cspine_triage::service::serve(config)
        }
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            warn_about(&config);
            let problems = config.dicom.tls_problems();
            for problem in &problems {
                eprintln!("error: {problem}");
            }
            anyhow::ensure!(
                problems.is_empty(),
                "{}: {} problem(s) with the TLS files",
                file.display(),
                problems.len()
            );
            print!("{}", config.to_toml()?);
            Ok(())
        }
        Command::Synth(args) => cspine_triage::synth::run(&args),
        Command::Infer(args) => cli::infer::run(&args),
        Command::Send(args) => cli::send::run(args),
        Command::Watch(args) => cli::watch::run(&args),
        Command::Echo(args) => cli::echo::run(args),
    }
}

fn warn_about(config: &Config) {
    for warning in config.warnings() {
        log::warn!("{warning}");
    }
}

fn main() -> ExitCode {
    logging::init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            logging::report_fatal(&err);
            ExitCode::FAILURE
        }
    }
}
