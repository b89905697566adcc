//! What a C-STORE response status (PS3.4 B.2.3, PS3.7 C) means for a queued entry:
//! delivered, try again later, or never deliverable to this destination.
//!
//! | Status                                   | Meaning                          | Entry          |
//! |------------------------------------------|----------------------------------|----------------|
//! | 0000                                     | Success                          | removed        |
//! | 0001, 0107, 0116, Bxxx                   | Warning (stored, with remarks)   | removed        |
//! | 0111                                     | Duplicate SOP Instance: it is there | removed     |
//! | A7xx, 0110, 0213, FE00, any other        | out of resources, processing failure, cancel, unknown | retried with backoff |
//! | A9xx, Cxxx, 0122, 0124, 0117, 0106, 0120, 0121 | data set does not match the SOP class, cannot understand, SOP class not supported, not authorised, invalid object or attribute | quarantined |
//!
//! "Permanent" means that sending the same bytes again to the same destination cannot
//! succeed without a human changing something (the PACS's configuration or the object):
//! such an entry is moved to the destination's `rejected/` folder with an error in the
//! log, instead of blocking the queue forever. Anything not known to be permanent is
//! retried: a transient fault must never lose an object.

/// The meaning of a C-STORE response status for the entry that was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Stored (Success, Warning, or already there): remove the entry.
    Delivered,
    /// Not stored this time; send it again later (after backoff).
    Transient,
    /// Not stored and never will be as it is: quarantine the entry.
    Permanent,
}

impl StoreOutcome {
    /// Classifies a C-STORE response status.
    pub fn of_status(status: u16) -> StoreOutcome {
        match status {
            0x0000 | 0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF | 0x0111 => StoreOutcome::Delivered,
            0xA900..=0xA9FF
            | 0xC000..=0xCFFF
            | 0x0122
            | 0x0124
            | 0x0117
            | 0x0106
            | 0x0120
            | 0x0121 => StoreOutcome::Permanent,
            _ => StoreOutcome::Transient,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        for s in [0x0000, 0x0001, 0xB000, 0xB007, 0x0111] {
            assert_eq!(
                StoreOutcome::of_status(s),
                StoreOutcome::Delivered,
                "{s:04X}"
            );
        }
        for s in [0xA700, 0xA7FF, 0x0110, 0xFE00, 0x0213, 0x1234] {
            assert_eq!(
                StoreOutcome::of_status(s),
                StoreOutcome::Transient,
                "{s:04X}"
            );
        }
        for s in [0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0122, 0x0124] {
            assert_eq!(
                StoreOutcome::of_status(s),
                StoreOutcome::Permanent,
                "{s:04X}"
            );
        }
    }
}
