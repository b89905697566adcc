//! The events the alert stage records: a result's analysis (durations from its timings,
//! up to the commit) and the outbox's depth.

use time::OffsetDateTime;

use super::outbox::Outbox;
use crate::result;

/// `event` ([`analysis_done`]) with `inference_done_to_published_secs` counted up to now:
/// the commit, which `timings.published` records.
pub(super) fn published_now(
    mut event: crate::events::Event,
    inference_end: Option<OffsetDateTime>,
) -> crate::events::Event {
    use crate::events::{Event, StageDurations};
    if let Event::AnalysisDone { durations, .. } = &mut event {
        durations.inference_done_to_published_secs =
            StageDurations::between(inference_end, Some(OffsetDateTime::now_utc()));
    }
    event
}

/// The event of a result received from inference (durations from its `timings`).
pub(super) fn analysis_done(result: &result::TriageResult) -> crate::events::Event {
    use crate::events::StageDurations;
    let t = &result.timings;
    crate::events::Event::AnalysisDone {
        result_id: result.id.clone(),
        study_instance_uid: result.study_instance_uid.clone(),
        series_instance_uid: result.series_instance_uid.clone(),
        status: result.status.into(),
        instances: result.instances,
        durations: StageDurations {
            receive_to_complete_secs: StageDurations::between(
                t.first_instance_received,
                t.series_complete,
            ),
            complete_to_inference_done_secs: StageDurations::between(
                t.series_complete,
                t.inference_end,
            ),
            inference_done_to_published_secs: None,
        },
    }
}

/// The outbox's depth, as an event.
pub(crate) fn outbox_depth(outbox: &Outbox) -> crate::events::Event {
    crate::events::Event::OutboxDepth {
        entries: outbox.len(),
        bytes: outbox.bytes(),
    }
}
