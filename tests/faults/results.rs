//! Results: the ids docs/ALERTS.md documents, the outbox's entries, and what the
//! dashboard received (the delivery contract).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::common::{repo_root, Message, Subscriber};
use crate::studies::Source;
use crate::{ALERT_TOPIC, RESULT_TOPIC};

pub fn model_sha256() -> String {
    let text = std::fs::read_to_string(repo_root().join("models/model.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["sha256"].as_str().unwrap().to_string()
}

/// The result id docs/ALERTS.md documents for an analysis of exactly the instances
/// `sources` (one series) that reached `status`: hex sha256 of
/// "<Series Instance UID>\n<model sha256>\n<status>\n<sorted SOP Instance UIDs, \n-joined>".
pub fn documented_id(sources: &[Source], status: &str) -> String {
    let series = &sources[0].series;
    assert!(sources.iter().all(|s| &s.series == series), "one series");
    let mut sops: Vec<&str> = sources.iter().map(|s| s.sop.as_str()).collect();
    sops.sort_unstable();
    sops.dedup();
    hex::encode(Sha256::digest(
        format!(
            "{series}\n{}\n{status}\n{}",
            model_sha256(),
            sops.join("\n")
        )
        .as_bytes(),
    ))
}

/// The ids an analysis of every instance of `sources` (one series) can have, one per
/// status: these tests check delivery, not the model's verdict.
pub fn complete_ids(sources: &[Source]) -> BTreeSet<String> {
    ["positive", "negative", "indeterminate", "failed"]
        .iter()
        .map(|status| documented_id(sources, status))
        .collect()
}

/// The one id of `candidates` in `ids`, if any.
pub fn one_of(ids: &BTreeSet<String>, candidates: &BTreeSet<String>) -> Option<String> {
    let mut found = ids.intersection(candidates);
    let id = found.next().cloned();
    assert!(found.next().is_none(), "two results for one analysis");
    id
}

/// The delivered result is under the id documented for its status and instances.
pub fn assert_documented_id(result: &serde_json::Value, sources: &[Source]) {
    let status = result["status"].as_str().unwrap();
    assert_eq!(
        result["id"],
        documented_id(sources, status).as_str(),
        "{result}"
    );
    assert_eq!(result["instances"], sources.len(), "{result}");
}

/// Ids of the entries in the outbox directory, in sequence order (each entry file starts
/// with a JSON header line that names its id).
pub fn outbox_ids(outbox: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(outbox)
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("entry"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|p| {
            let bytes = std::fs::read(p).ok()?;
            let line = bytes.split(|&b| b == b'\n').next()?;
            let header: serde_json::Value = serde_json::from_slice(line).ok()?;
            Some(header["id"].as_str()?.to_string())
        })
        .collect()
}

/// The result of `id` as the dashboard got it, after checking the documented delivery
/// contract: at least one copy on `result`, every copy byte-identical (re-deliveries are),
/// and on `alert` the same bytes if and only if the result is positive. Returns the result
/// and the number of copies received.
pub fn delivered(sub: &Subscriber, id: &str) -> (serde_json::Value, usize) {
    let parse = |m: &Message| serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap();
    let copies: Vec<Message> = sub
        .on(RESULT_TOPIC)
        .into_iter()
        .filter(|m| parse(m)["id"] == id)
        .collect();
    assert!(!copies.is_empty(), "no result with id {id}");
    assert!(
        copies.iter().all(|m| m.payload == copies[0].payload),
        "{} results with id {id} differ: a re-delivery must be byte-identical\n{}",
        copies.len(),
        copies
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let result = parse(&copies[0]);
    let alerts: Vec<Message> = sub
        .on(ALERT_TOPIC)
        .into_iter()
        .filter(|m| parse(m)["id"] == id)
        .collect();
    if result["status"] == "positive" {
        assert!(!alerts.is_empty(), "positive result {id} without an alert");
        assert!(alerts.iter().all(|m| m.payload == copies[0].payload));
    } else {
        assert!(
            alerts.is_empty(),
            "alert published for a {} result",
            result["status"]
        );
    }
    (result, copies.len())
}

pub fn ids_on(sub: &Subscriber, topic: &str) -> BTreeSet<String> {
    sub.on(topic)
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Distinct payloads per result id on `topic`, in order of arrival.
pub fn payloads_by_id(sub: &Subscriber, topic: &str) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for m in sub.on(topic) {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let copies = out
            .entry(v["id"].as_str().unwrap().to_string())
            .or_default();
        if !copies.contains(&m.payload) {
            copies.push(m.payload);
        }
    }
    out
}

pub fn published_at(result: &serde_json::Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        result["timings"]["published"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}
