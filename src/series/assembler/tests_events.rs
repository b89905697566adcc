//! Tests of the events the state machine records ([`Assembler::take_events`]): a series
//! assembled, re-opened by a late instance, remembered after a restart.

use std::time::Instant;

use super::tests::{add_series, analysed, config, instance, ms, restore};
use super::*;
use crate::events::{Event, SeriesCompletion};

#[test]
fn a_series_is_assembled_then_reopened_by_a_late_instance() {
    let mut a = Assembler::new(config());
    let t0 = Instant::now();
    add_series(&mut a, "1.2.3.1", 5, "BONE", 1.0, t0, ms(100));
    assert!(
        a.take_events().is_empty(),
        "nothing before the quiet period"
    );
    assert_eq!(a.poll(t0 + ms(10_000)).len(), 1);
    assert_eq!(
        a.take_events(),
        [Event::SeriesAssembled {
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.1".into(),
            instances: 5,
            completion: SeriesCompletion::QuietPeriod,
        }]
    );
    let (s, h) = instance("1.2.3.1", 5, "BONE", 1.0);
    a.add(&s, h, t0 + ms(11_000));
    assert_eq!(
        a.take_events(),
        [Event::SeriesReopened {
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.1".into(),
            sop_instance_uid: "1.2.3.1.5".into(),
        }]
    );
    assert_eq!(a.poll(t0 + ms(14_000)).len(), 1);
    assert!(matches!(
        &a.take_events()[..],
        [Event::SeriesAssembled { instances: 6, .. }]
    ));
}

#[test]
fn a_restored_series_is_remembered() {
    let mut a = Assembler::new(config()).with_feedback(true);
    let t0 = Instant::now();
    restore(&mut a, &analysed("1.2.3.1", 4, 100), t0);
    assert!(a.poll(t0 + ms(1_000)).is_empty());
    assert_eq!(
        a.take_events(),
        [Event::SeriesRemembered {
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.1".into(),
            instances: 4,
            result_id: "ab".into(),
        }]
    );
}
