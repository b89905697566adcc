//! The identity of a series within the series stage: its Study and Series Instance UIDs
//! together ([`SeriesKey`]).

use std::fmt;

/// A series, by its Study and Series Instance UIDs.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    /// Study Instance UID.
    pub study: String,
    /// Series Instance UID.
    pub series: String,
}

impl SeriesKey {
    pub fn new(study: impl Into<String>, series: impl Into<String>) -> SeriesKey {
        SeriesKey {
            study: study.into(),
            series: series.into(),
        }
    }
}

/// "series S of study T", as the logs name a series.
impl fmt::Display for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "series {} of study {}", self.series, self.study)
    }
}
