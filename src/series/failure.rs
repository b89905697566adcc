//! Why a series analysis failed ([`FailReason`]): the reason of a
//! [`super::SeriesOutcome::Failed`] and of every `failed` result, whose published
//! `reason` is its [`std::fmt::Display`] text.

use super::volume::BuildError;

/// Why a series analysis failed: no volume could be built, or the model could not run on
/// it. [`std::fmt::Display`] is the `reason` of the `failed` result (and of the
/// `series_failed` event), causes included; so [`std::error::Error::source`] is `None`, a
/// reporter walking it would print them twice.
#[derive(Debug)]
pub enum FailReason {
    /// A study reached the builder without any candidate series.
    NoSeries,
    /// Earlier builds of this series stopped the daemon `stops` times (out of memory, a
    /// hard crash): not built again ([`super::AssemblyConfig::max_build_attempts`]).
    NotBuiltAgain { stops: u32, max_attempts: u32 },
    /// The volume of the series could not be built, nor that of any fallback series of
    /// its study (best first).
    Build {
        error: BuildError,
        fallbacks: Vec<FallbackFailure>,
    },
    /// A volume was built but the analysis did not run through (preprocessing, the model,
    /// the key image).
    Inference { cause: anyhow::Error },
}

/// A fallback series that could not be built either ([`FailReason::Build`]).
#[derive(Debug)]
pub struct FallbackFailure {
    pub series_instance_uid: String,
    pub error: BuildError,
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailReason::NoSeries => f.write_str("no series to build"),
            FailReason::NotBuiltAgain {
                stops,
                max_attempts,
            } => write!(
                f,
                "the daemon stopped {stops} times while building this series (out of memory?): \
                 not built again (series.max_build_attempts = {max_attempts})"
            ),
            FailReason::Build { error, fallbacks } => {
                write!(f, "{error}")?;
                for fallback in fallbacks {
                    write!(
                        f,
                        "; fallback series {} failed too: {}",
                        fallback.series_instance_uid, fallback.error
                    )?;
                }
                Ok(())
            }
            FailReason::Inference { cause } => write!(f, "inference failed: {cause:#}"),
        }
    }
}

impl std::error::Error for FailReason {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::VolumeError;

    #[test]
    fn the_text_is_the_published_reason() {
        assert_eq!(FailReason::NoSeries.to_string(), "no series to build");
        assert_eq!(
            FailReason::NotBuiltAgain {
                stops: 3,
                max_attempts: 3
            }
            .to_string(),
            "the daemon stopped 3 times while building this series (out of memory?): not \
             built again (series.max_build_attempts = 3)"
        );
        let too_many = || {
            BuildError::Volume(VolumeError::TooManySlices {
                slices: 11,
                max: 10,
            })
        };
        assert_eq!(
            FailReason::Build {
                error: too_many(),
                fallbacks: vec![FallbackFailure {
                    series_instance_uid: "1.2.3".into(),
                    error: BuildError::Headers(anyhow::anyhow!("series has no image instances")),
                }],
            }
            .to_string(),
            format!(
                "{}; fallback series 1.2.3 failed too: series has no image instances",
                too_many()
            )
        );
        let cause = anyhow::anyhow!("out of memory").context("running the model");
        assert_eq!(
            FailReason::Inference { cause }.to_string(),
            "inference failed: running the model: out of memory"
        );
    }

    #[test]
    fn a_decode_error_names_the_slice_and_its_causes() {
        let e = BuildError::Decode {
            sop_instance_uid: "1.2.3.4".into(),
            path: "/spool/a.dcm".into(),
            cause: anyhow::anyhow!("truncated").context("cannot read /spool/a.dcm"),
        };
        assert_eq!(
            e.to_string(),
            "cannot decode slice 1.2.3.4 (/spool/a.dcm): cannot read /spool/a.dcm: truncated"
        );
        // Through anyhow (tests and tools use `?`): the same text, nothing repeated.
        assert_eq!(
            format!("{:#}", anyhow::Error::new(e)),
            "cannot decode slice 1.2.3.4 (/spool/a.dcm): cannot read /spool/a.dcm: truncated"
        );
    }
}
