//! The spool after the store: re-index at start-up, the analysed mark of a series, the
//! release of files the assembler no longer needs, and recovery after a restart (see the
//! life cycle in the [module docs](super)).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::instance::recheck_instance;
use super::{
    safe_name, series_dir, StoredInstance, ATTEMPTS_FILE, ATTEMPTS_TMP, MARK_FILE, MARK_TMP,
    REJECTED_DIR, TMP_DIR,
};
use crate::dicom::Arrival;
use crate::durable::{fsync_dir, quarantine, write_atomically};
use crate::events::{Event, Events, MarkCause};

/// Recovers every finished instance in the spool, oldest first. Leftover temp files
/// are removed (never acknowledged). Every instance file is re-checked (parsed, and its
/// declared lengths checked against its size: [`recheck_instance`]); one that fails is
/// logged as an error and moved to `.rejected/` (kept for a human under a unique name,
/// not fed to the pipeline). Safe after `kill -9`.
pub fn reindex(root: &Path) -> Result<Vec<StoredInstance>> {
    let tmp = root.join(TMP_DIR);
    if tmp.is_dir() {
        for entry in fs::read_dir(&tmp)? {
            let path = entry?.path();
            log::info!("removing unfinished receive {}", path.display());
            let _ = fs::remove_file(&path);
        }
    }
    let mut out = Vec::new();
    if !root.is_dir() {
        return Ok(out);
    }
    for study in sorted_dirs(root)? {
        for series in sorted_dirs(&study)? {
            for entry in fs::read_dir(&series)
                .with_context(|| format!("cannot list {}", series.display()))?
            {
                let path = entry?.path();
                if path.extension().and_then(|e| e.to_str()) != Some("dcm") {
                    continue;
                }
                match recheck_instance(&path) {
                    Ok((info, received_at)) => {
                        let received_at = received_at
                            .or_else(|| {
                                fs::metadata(&path)
                                    .and_then(|m| m.modified())
                                    .ok()
                                    .map(OffsetDateTime::from)
                            })
                            .unwrap_or_else(OffsetDateTime::now_utc);
                        out.push(StoredInstance {
                            path,
                            study_instance_uid: info.study_instance_uid,
                            series_instance_uid: info.series_instance_uid,
                            sop_instance_uid: info.sop_instance_uid,
                            sop_class_uid: info.sop_class_uid,
                            calling_ae: info.calling_ae,
                            received_at,
                            arrival: Arrival::First,
                        })
                    }
                    Err(e) => {
                        let dest = quarantine(&path, &root.join(REJECTED_DIR))?;
                        log::error!(
                            "spool file {} failed its re-check at start-up ({e:#}): moved to \
                             {}, kept for a human; it is not analysed",
                            path.display(),
                            dest.display()
                        );
                    }
                }
            }
        }
    }
    out.sort_by_key(|i| i.received_at);
    Ok(out)
}

/// The durable "analysed" mark of a series (`<series dir>/.analysed.json`): the instances
/// of the series that a result committed to the outbox has analysed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysedMark {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    /// When the (last) result was committed.
    #[serde(with = "time::serde::rfc3339")]
    pub analysed_at: OffsetDateTime,
    /// Id of the last result committed for the series.
    pub result_id: String,
    /// Every SOP Instance UID analysed by a committed result of the series (the union over
    /// its results), sorted, without repeats.
    pub sop_instance_uids: Vec<String>,
}

impl AnalysedMark {
    pub fn covers(&self, sop_instance_uid: &str) -> bool {
        self.sop_instance_uids
            .binary_search_by(|s| s.as_str().cmp(sop_instance_uid))
            .is_ok()
    }
}

/// Reads the analysed mark in `series_dir`; `None` when there is none or it is unreadable
/// (logged: the series is then analysed again, which is the safe side).
pub fn read_mark(series_dir: &Path) -> Option<AnalysedMark> {
    let path = series_dir.join(MARK_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!(
                "cannot read {}: {e}; the series is analysed again",
                path.display()
            );
            return None;
        }
    };
    match serde_json::from_slice::<AnalysedMark>(&bytes) {
        Ok(mut mark) => {
            // Sorted for `covers`, whoever wrote it.
            mark.sop_instance_uids.sort_unstable();
            mark.sop_instance_uids.dedup();
            Some(mark)
        }
        Err(e) => {
            log::warn!(
                "{} is not a valid analysed mark ({e}); the series is analysed again",
                path.display()
            );
            None
        }
    }
}

/// Records durably that a result analysing `sop_instance_uids` of a series is committed:
/// the series' mark becomes the union of its previous instances and these (temp file,
/// fsync, rename, directory fsync). Returns how many instances the mark names, or `None`
/// when the series is not in the spool (nothing to keep).
pub fn mark_analysed(
    root: &Path,
    study_uid: &str,
    series_uid: &str,
    result_id: &str,
    sop_instance_uids: &[String],
    analysed_at: OffsetDateTime,
) -> Result<Option<usize>> {
    let dir = series_dir(root, study_uid, series_uid);
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut sops: Vec<String> = read_mark(&dir)
        .map(|m| m.sop_instance_uids)
        .unwrap_or_default();
    sops.extend(sop_instance_uids.iter().cloned());
    sops.sort_unstable();
    sops.dedup();
    let mark = AnalysedMark {
        study_instance_uid: study_uid.to_string(),
        series_instance_uid: series_uid.to_string(),
        analysed_at,
        result_id: result_id.to_string(),
        sop_instance_uids: sops,
    };
    write_mark(&dir, &mark)?;
    Ok(Some(mark.sop_instance_uids.len()))
}

/// Durable count of the builds of a series that began and did not end: a build that
/// kills the process (out of memory on a hostile or huge series) must not be started again
/// on every restart, forever. `<series dir>/.attempts.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Attempts {
    unfinished: u32,
}

/// Records (durably) that a build of the series begins and returns how many earlier
/// builds began without ending ([`end_attempt`]): a process killed while building. 0 when
/// the series is not in the spool.
pub fn begin_attempt(root: &Path, study_uid: &str, series_uid: &str) -> Result<u32> {
    let dir = series_dir(root, study_uid, series_uid);
    if !dir.is_dir() {
        return Ok(0);
    }
    let earlier = fs::read(dir.join(ATTEMPTS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Attempts>(&b).ok())
        .unwrap_or_default()
        .unfinished;
    let json = serde_json::to_vec(&Attempts {
        unfinished: earlier + 1,
    })?;
    write_atomically(&dir, ATTEMPTS_FILE, ATTEMPTS_TMP, &[&json])?;
    Ok(earlier)
}

/// The build that [`begin_attempt`] recorded ended (with a volume or a failure).
pub fn end_attempt(root: &Path, study_uid: &str, series_uid: &str) -> Result<()> {
    let dir = series_dir(root, study_uid, series_uid);
    match fs::remove_file(dir.join(ATTEMPTS_FILE)) {
        Ok(()) => fsync_dir(&dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!(
            "cannot remove {}: {e}",
            dir.join(ATTEMPTS_FILE).display()
        )),
    }
}

/// Writes `mark` as the analysed mark in `dir` (temp file, fsync, rename, directory fsync).
fn write_mark(dir: &Path, mark: &AnalysedMark) -> Result<()> {
    let json = serde_json::to_vec(mark).context("cannot encode the analysed mark")?;
    write_atomically(dir, MARK_FILE, MARK_TMP, &[&json])
}

/// A corrected version of `sop_instance_uid` is about to replace the analysed one: the
/// series' mark stops covering it (durably), so that a restart analyses the new version.
pub(super) fn uncover(
    root: &Path,
    study_uid: &str,
    series_uid: &str,
    sop_instance_uid: &str,
) -> Result<()> {
    let dir = series_dir(root, study_uid, series_uid);
    let Some(mut mark) = read_mark(&dir) else {
        return Ok(());
    };
    let before = mark.sop_instance_uids.len();
    mark.sop_instance_uids.retain(|s| s != sop_instance_uid);
    if mark.sop_instance_uids.len() == before {
        return Ok(());
    }
    write_mark(&dir, &mark)
}

/// Removes instance files of one series (`paths`, which must lie in the series
/// directory; missing ones are fine). With `forget`, or once no instance is left, the
/// series' analysed mark goes too, after the files (a crash in between leaves a mark that
/// covers what is left: remembered as analysed, not analysed again), and an empty series
/// (and study) directory is removed. Returns how many files were removed.
pub fn release(
    root: &Path,
    study_uid: &str,
    series_uid: &str,
    paths: &[PathBuf],
    forget: bool,
) -> Result<usize> {
    release_with(root, study_uid, series_uid, paths, forget, || ())
}

/// [`release`], removing the emptied directories while holding what `lock_dirs` returns
/// ([`super::Spool::release`]: the lock that keeps a store from creating a directory and
/// linking into it while it is removed).
pub(super) fn release_with<G>(
    root: &Path,
    study_uid: &str,
    series_uid: &str,
    paths: &[PathBuf],
    forget: bool,
    lock_dirs: impl FnOnce() -> G,
) -> Result<usize> {
    let dir = series_dir(root, study_uid, series_uid);
    let mut n = 0;
    for path in paths {
        if path.parent() != Some(dir.as_path()) {
            log::warn!(
                "not removing {}: not in the spool directory of series {series_uid}",
                path.display()
            );
            continue;
        }
        match fs::remove_file(path) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!("cannot remove {}: {e}", path.display())),
        }
    }
    if !dir.is_dir() {
        return Ok(n);
    }
    if n > 0 {
        fsync_dir(&dir)?;
    }
    let instances_left = fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .any(|e| e.path().extension().and_then(|x| x.to_str()) == Some("dcm"));
    if forget || !instances_left {
        for name in [MARK_FILE, MARK_TMP, ATTEMPTS_FILE, ATTEMPTS_TMP] {
            match fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow!("cannot remove {}: {e}", dir.join(name).display())),
            }
        }
    }
    if !instances_left {
        let _dirs = lock_dirs();
        remove_empty_series_dir(root, &dir)?;
    } else {
        fsync_dir(&dir)?;
    }
    Ok(n)
}

/// Removes an empty series directory, and its study directory once empty too.
fn remove_empty_series_dir(root: &Path, dir: &Path) -> Result<()> {
    match fs::remove_dir(dir) {
        Ok(()) => {}
        // Something arrived meanwhile: it stays, and so does the directory.
        Err(_)
            if fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false) =>
        {
            return fsync_dir(dir)
        }
        Err(e) => return Err(anyhow!("cannot remove {}: {e}", dir.display())),
    }
    let study_dir = dir.parent().context("series directory without parent")?;
    // Another series of the study may still be arriving: only remove an empty study dir.
    if fs::remove_dir(study_dir).is_ok() {
        fsync_dir(root)
    } else {
        fsync_dir(study_dir)
    }
}

/// A series whose instances in the spool are all analysed (see [`recover`]).
#[derive(Debug, Clone)]
pub struct AnalysedSeries {
    pub mark: AnalysedMark,
    /// Its instances in the spool, all covered by the mark.
    pub instances: Vec<StoredInstance>,
}

/// What a restart finds in the spool.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Instances to assemble, oldest first: those of series without a mark, and those that
    /// arrived after their series' mark (the series is then analysed again, whole).
    pub instances: Vec<StoredInstance>,
    /// Instances covered by their series' analysed mark, by series: already analysed,
    /// their results are in the outbox (or delivered). Kept, not analysed again.
    pub analysed: Vec<AnalysedSeries>,
}

/// [`reindex`], then sorts the instances by their series' analysed marks (see
/// [`Recovered`]). A mark left without any instance (a crash during a release) is removed.
pub fn recover(root: &Path) -> Result<Recovered> {
    let all = reindex(root)?;
    let mut marks: std::collections::BTreeMap<PathBuf, Option<AnalysedSeries>> = Default::default();
    let mut out = Recovered::default();
    for instance in all {
        let dir = instance
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let entry = marks.entry(dir.clone()).or_insert_with(|| {
            read_mark(&dir).map(|mark| AnalysedSeries {
                mark,
                instances: Vec::new(),
            })
        });
        match entry {
            Some(series) if series.mark.covers(&instance.sop_instance_uid) => {
                series.instances.push(instance)
            }
            _ => out.instances.push(instance),
        }
    }
    out.analysed = marks
        .into_values()
        .flatten()
        .filter(|s| !s.instances.is_empty())
        .collect();
    // Marks of series without any instance left.
    if root.is_dir() {
        for study in sorted_dirs(root)? {
            for series in sorted_dirs(&study)? {
                let leftovers =
                    series.join(MARK_FILE).exists() || series.join(ATTEMPTS_FILE).exists();
                if leftovers && !has_instances(&series)? {
                    log::info!(
                        "removing the analysed mark of released series {}",
                        series.display()
                    );
                    for name in [MARK_FILE, MARK_TMP, ATTEMPTS_FILE, ATTEMPTS_TMP] {
                        let _ = fs::remove_file(series.join(name));
                    }
                    remove_empty_series_dir(root, &series)?;
                }
            }
        }
    }
    Ok(out)
}

/// A crash between committing a result to the outbox and writing its series' analysed
/// mark leaves the series unmarked although its result waits in the outbox: recovered as
/// is, the series would be analysed again and its id published a second time, with other
/// `timings`. This marks each series of `recovered.instances` for which `committed_id`
/// (given the series and the SOP Instance UIDs the spool holds of it, marked ones
/// included) names a committed result, and moves its instances to `analysed`. Call it
/// before the outbox publishes anything, so that a waiting entry is still there to find.
/// Each mark written is recorded on `events` ([`MarkCause::WaitingInOutbox`]).
pub fn mark_committed(
    root: &Path,
    mut recovered: Recovered,
    committed_id: impl Fn(&str, &[String]) -> Option<String>,
    events: &Events,
) -> Result<Recovered> {
    let key = |study: &str, series: &str| (study.to_owned(), series.to_owned());
    let mut unmarked: std::collections::BTreeMap<(String, String), Vec<StoredInstance>> =
        Default::default();
    for i in std::mem::take(&mut recovered.instances) {
        unmarked
            .entry(key(&i.study_instance_uid, &i.series_instance_uid))
            .or_default()
            .push(i);
    }
    let mut keep = Vec::new();
    for ((study, series), instances) in unmarked {
        let earlier = recovered.analysed.iter().position(|a| {
            a.mark.study_instance_uid == study && a.mark.series_instance_uid == series
        });
        let mut sops: Vec<String> = instances
            .iter()
            .map(|i| i.sop_instance_uid.clone())
            .collect();
        if let Some(a) = earlier {
            sops.extend(recovered.analysed[a].mark.sop_instance_uids.iter().cloned());
        }
        sops.sort_unstable();
        sops.dedup();
        let Some(id) = committed_id(&series, &sops) else {
            keep.push(instances);
            continue;
        };
        let now = OffsetDateTime::now_utc();
        mark_analysed(root, &study, &series, &id, &sops, now)?;
        log::info!(
            "series {series} of study {study}: result {id} waits in the outbox but the series \
             was not marked analysed (a crash in between): marked now, not analysed again"
        );
        events.emit(Event::SeriesMarked {
            study_instance_uid: study.clone(),
            series_instance_uid: series.clone(),
            result_id: id.clone(),
            instances: sops.len(),
            cause: MarkCause::WaitingInOutbox,
        });
        let mark = AnalysedMark {
            study_instance_uid: study,
            series_instance_uid: series,
            analysed_at: now,
            result_id: id,
            sop_instance_uids: sops,
        };
        match earlier {
            Some(a) => {
                recovered.analysed[a].mark = mark;
                recovered.analysed[a].instances.extend(instances);
            }
            None => recovered.analysed.push(AnalysedSeries { mark, instances }),
        }
    }
    // Oldest first again, as `recover` orders them.
    recovered.instances = keep.into_iter().flatten().collect();
    recovered.instances.sort_by_key(|i| i.received_at);
    Ok(recovered)
}

fn has_instances(dir: &Path) -> Result<bool> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .any(|e| e.path().extension().and_then(|x| x.to_str()) == Some("dcm")))
}

/// Deletes one series directory from the spool at `root` (and its study directory
/// once empty). Returns how many instance files were removed.
pub fn delete_series(root: &Path, study_uid: &str, series_uid: &str) -> Result<usize> {
    let study_dir = root.join(safe_name(study_uid));
    let series_dir = study_dir.join(safe_name(series_uid));
    if !series_dir.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for entry in fs::read_dir(&series_dir)
        .with_context(|| format!("cannot list {}", series_dir.display()))?
    {
        let path = entry?.path();
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        n += 1;
    }
    fs::remove_dir(&series_dir)
        .with_context(|| format!("cannot remove {}", series_dir.display()))?;
    // Another series of the study may still be arriving: only remove an empty study dir.
    if fs::remove_dir(&study_dir).is_ok() {
        fsync_dir(root)?;
    } else {
        fsync_dir(&study_dir)?;
    }
    Ok(n)
}

fn sorted_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    v.sort();
    Ok(v)
}
