//! `cspine-triage`: thin command line over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    Infer(cspine_triage::inference::cli::InferArgs),
    /// Send DICOM files to a Storage SCP (C-STORE), as a scanner would.
    Send(SendArgs),
    /// Subscribe to a daemon's results on an MQTT broker and print them.
    Watch(cspine_triage::alert::watch::WatchArgs),
    /// Send a C-ECHO (DICOM Verification) to a DICOM node, over TCP or TLS.
    Echo(EchoArgs),
}

#[derive(clap::Args)]
struct EchoArgs {
    /// Peer address, host:port.
    address: String,
    /// Called AE title (the peer's).
    #[arg(long, default_value = "CSPINE")]
    called_ae: String,
    /// Our (calling) AE title.
    #[arg(long, default_value = "CSPINE-SCU")]
    calling_ae: String,
    /// PEM bundle of the CAs trusted to sign the peer's certificate; any --tls-* option
    /// turns TLS on, and TLS needs this one.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// PEM certificate chain offered as our client certificate.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Name the peer's certificate must carry (default: the host part of the address).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Seconds to connect and for each answer.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

#[derive(clap::Args)]
struct SendArgs {
    /// SCP address, host:port.
    address: String,
    /// DICOM files or directories (walked recursively).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Called AE title (the SCP's).
    #[arg(long, default_value = "CSPINE")]
    called_ae: String,
    /// Our (calling) AE title.
    #[arg(long, default_value = "CSPINE-SCU")]
    calling_ae: String,
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
        Command::Infer(args) => cspine_triage::inference::cli::run(&args),
        Command::Send(args) => send(args),
        Command::Watch(args) => cspine_triage::alert::watch::run(&args),
        Command::Echo(args) => echo(args),
    }
}

fn warn_about(config: &Config) {
    for warning in config.warnings() {
        log::warn!("{warning}");
    }
}

fn send(args: SendArgs) -> Result<()> {
    use cspine_triage::dicom::scu;
    let files = scu::collect_files(&args.paths)?;
    let target = scu::StoreTarget {
        address: args.address,
        called_ae: args.called_ae,
        calling_ae: args.calling_ae,
    };
    let report = scu::send_files(&target, &files)?;
    for (path, reason) in &report.failed {
        eprintln!("not stored: {}: {reason}", path.display());
    }
    println!("{} of {} files stored", report.stored, files.len());
    anyhow::ensure!(
        report.failed.is_empty(),
        "{} files were not stored",
        report.failed.len()
    );
    Ok(())
}

fn echo(args: EchoArgs) -> Result<()> {
    use cspine_triage::dicom::{echo, tls::TlsConfig};
    anyhow::ensure!(
        args.timeout > 0.0 && args.timeout.is_finite(),
        "--timeout must be > 0"
    );
    let wants_tls = args.tls_ca.is_some()
        || args.tls_cert.is_some()
        || args.tls_key.is_some()
        || args.tls_server_name.is_some();
    let tls = wants_tls.then_some(TlsConfig {
        certificate: args.tls_cert,
        private_key: args.tls_key,
        ca: args.tls_ca,
        verify_client: false,
        server_name: args.tls_server_name,
    });
    let target = echo::EchoTarget {
        address: args.address,
        called_ae: args.called_ae,
        calling_ae: args.calling_ae,
        timeout: std::time::Duration::from_secs_f64(args.timeout),
    };
    echo::echo(&target, tls.as_ref())?;
    println!(
        "C-ECHO to {} at {}{}: Success",
        target.called_ae,
        target.address,
        if tls.is_some() { " (TLS)" } else { "" }
    );
    Ok(())
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
