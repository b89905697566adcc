//! `cspine-triage watch`: a small subscriber that prints the results a daemon publishes,
//! as a dashboard would see them. Used by the demo and handy on site for checking delivery.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};

/// `cspine-triage watch` arguments.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Broker URL (mqtt://host:port).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt: String,
    /// Topic prefix the daemon publishes under (ends with '/').
    #[arg(long, default_value = "cspine/")]
    pub prefix: String,
    /// Exit after this many distinct results (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    pub count: usize,
    /// Give up after this many seconds (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// Write received key images here as `<id>.png`.
    #[arg(long)]
    pub keyimage_dir: Option<PathBuf>,
}

/// Subscribes to `<prefix>#` and prints every result (one JSON document per line) to stdout;
/// re-deliveries of an id already seen are skipped, as a dashboard should do.
pub fn run(args: &WatchArgs) -> Result<()> {
    let url = if args.mqtt.contains("client_id=") {
        args.mqtt.clone()
    } else {
        let sep = if args.mqtt.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}client_id=cspine-watch-{}",
            args.mqtt,
            std::process::id()
        )
    };
    let mut options = MqttOptions::parse_url(&url)
        .with_context(|| format!("invalid broker URL {}", args.mqtt))?;
    // rumqttc refuses incoming packets over 10 KiB by default and drops the connection
    // (losing what follows): key images are up to `KEY_IMAGE_MAX_BYTES`.
    options.set_max_packet_size(
        2 * crate::result::KEY_IMAGE_MAX_BYTES + 64 * 1024,
        64 * 1024,
    );
    let (client, mut connection) = Client::new(options, 64);
    let filter = format!("{}#", args.prefix);
    client.subscribe(&filter, QoS::AtLeastOnce)?;
    if let Some(dir) = &args.keyimage_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }

    let deadline = (args.timeout > 0).then(|| Instant::now() + Duration::from_secs(args.timeout));
    let mut seen = HashSet::new();
    loop {
        if args.count > 0 && seen.len() >= args.count {
            return Ok(());
        }
        let wait = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) => left,
                None => bail!(
                    "timed out after {} s with {} of {} results",
                    args.timeout,
                    seen.len(),
                    args.count
                ),
            },
            None => Duration::from_secs(3600),
        };
        let event = match connection.recv_timeout(wait) {
            Ok(event) => event,
            Err(_) => continue,
        };
        match event {
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let topic = p.topic.as_str();
                if let Some(id) = topic.rsplit_once("keyimage/").map(|(_, id)| id) {
                    if let Some(dir) = &args.keyimage_dir {
                        let path = dir.join(format!("{id}.png"));
                        std::fs::write(&path, &p.payload)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        log::info!("key image written to {}", path.display());
                    }
                } else if topic.ends_with("/result") {
                    let value: serde_json::Value = serde_json::from_slice(&p.payload)
                        .with_context(|| format!("non-JSON payload on {topic}"))?;
                    let id = value["id"].as_str().unwrap_or_default().to_string();
                    if seen.insert(id) {
                        println!("{}", serde_json::to_string(&value)?);
                    }
                }
            }
            Ok(_) => {}
            Err(err) => {
                log::warn!("broker connection: {err}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}
