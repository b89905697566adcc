//! Where the ONNX graph is cut between its per-slice and across-slices parts: every node
//! downstream of a recurrent op is across slices; the tensors it reads from the per-slice
//! part are the cuts.

/// Where the ONNX graph is cut between its per-slice and across-slices parts (names of
/// ONNX tensors; ONNX nodes are stored in topological order).
pub(super) struct GraphSplit {
    /// Every tensor computed downstream of a recurrent op (its outputs included).
    pub(super) across: std::collections::HashSet<String>,
    /// Tensors computed from the model input by per-slice nodes and read by across-slices
    /// nodes, in the order the graph first reads them.
    pub(super) cuts: Vec<String>,
}

impl GraphSplit {
    /// None when the graph has no recurrent op. Nodes writing a tensor of `forced` belong
    /// to the across-slices part too.
    pub(super) fn of(
        graph: &tract_onnx::pb::GraphProto,
        forced: &std::collections::HashSet<String>,
    ) -> Option<GraphSplit> {
        use std::collections::HashSet;
        let initializers: HashSet<&str> = graph.initializer.iter().map(|t| &*t.name).collect();
        // Tensors that depend on the model input (constants and weights do not).
        let mut from_input: HashSet<&str> = graph
            .input
            .iter()
            .map(|i| &*i.name)
            .filter(|n| !initializers.contains(n))
            .collect();
        let mut across: HashSet<String> = HashSet::new();
        let mut cuts: Vec<String> = vec![];
        for node in &graph.node {
            let recurrent = matches!(node.op_type.as_str(), "GRU" | "LSTM" | "RNN");
            let is_across = recurrent
                || node.input.iter().any(|i| across.contains(i.as_str()))
                || node.output.iter().any(|o| forced.contains(o));
            if is_across {
                for i in &node.input {
                    if from_input.contains(i.as_str())
                        && !across.contains(i.as_str())
                        && !cuts.contains(i)
                    {
                        cuts.push(i.clone());
                    }
                }
                across.extend(node.output.iter().cloned());
            }
            if node.input.iter().any(|i| from_input.contains(i.as_str())) {
                from_input.extend(node.output.iter().map(|o| &**o));
            }
        }
        (!cuts.is_empty()).then_some(GraphSplit { across, cuts })
    }
}
