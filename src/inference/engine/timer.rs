//! Per-node timing of a plan ([`PlanTimer`]): what `infer --profile` reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

/// `(node name, op name, time)` per node of a plan, in plan order.
pub type NodeTimes = Vec<(String, String, Duration)>;

/// Runs one plan any number of times, summing each node's time over the runs.
pub(super) struct PlanTimer {
    state: TypedSimpleState,
    times: BTreeMap<usize, Duration>,
}

impl PlanTimer {
    pub(super) fn new(plan: &Arc<TypedRunnableModel>) -> TractResult<PlanTimer> {
        Ok(PlanTimer {
            state: plan.spawn()?,
            times: BTreeMap::new(),
        })
    }

    pub(super) fn run(&mut self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let times = &mut self.times;
        self.state
            .run_plan_with_eval(inputs, |ctx, op_state, node, inputs| {
                let t = Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                *times.entry(node.id).or_default() += t.elapsed();
                r
            })
    }

    /// `(prefix + node name, op name, time)` per node, in plan order.
    pub(super) fn node_times(&self, prefix: &str) -> NodeTimes {
        let model = self.state.plan().model();
        self.times
            .iter()
            .map(|(&id, &t)| {
                let node = model.node(id);
                (
                    format!("{prefix}{}", node.name),
                    node.op().name().to_string(),
                    t,
                )
            })
            .collect()
    }
}
