//! The decision thresholds in effect (the contract's, possibly overridden by
//! configuration) and the sigmoid that turns the model's logits into probabilities.

use std::collections::BTreeMap;

use crate::inference::contract::{ModelContract, VERTEBRAE};

/// Decision thresholds in effect: the contract's, possibly overridden by configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub patient: f32,
    /// C1..C7.
    pub vertebrae: [f32; 7],
}

impl Thresholds {
    pub fn resolve(
        contract: &ModelContract,
        patient: Option<f32>,
        vertebrae: &BTreeMap<String, f32>,
    ) -> Thresholds {
        let mut t = Thresholds {
            patient: patient.unwrap_or(contract.thresholds.patient),
            vertebrae: [0.5; 7],
        };
        for (i, v) in VERTEBRAE.iter().enumerate() {
            t.vertebrae[i] = vertebrae
                .get(*v)
                .or_else(|| contract.thresholds.vertebrae.get(*v))
                .copied()
                .unwrap_or(0.5);
        }
        t
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
