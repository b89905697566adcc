//! The "dequantized" graph: the shipped int8 ONNX model rewritten, at load and at the
//! protobuf level (before tract analyses it), into a float graph with the same weights.
//!
//! tract-cuda 0.23.9 leaves every int8 convolution on the CPU (with copies to and from the
//! GPU), so on a GPU the int8 file ran slower than on the CPU. This rewrite is "weight-only
//! int8, dequantized at load":
//! - every `QLinearConv` whose input comes from a `QuantizeLinear` and whose output goes only
//!   to one `DequantizeLinear` becomes a float `Conv` reading the `QuantizeLinear`'s float
//!   input and writing the `DequantizeLinear`'s float output; its weights are
//!   `w_scale * (w_q - w_zero_point)` (per tensor or per output channel, as in the file) and
//!   its bias `bias_q * x_scale * w_scale`;
//! - activations stay float tensors but keep the int8 graph's values: where the int8 graph
//!   quantizes one (the conv's input `QuantizeLinear`, the conv's requantized output) the
//!   float graph rounds it to the same grid, `scale * clip(round(x / scale), q_min - zp,
//!   q_max - zp)` (`Div`, `Round`, `Clip`, `Mul`: float element-wise ops that tract-cuda runs
//!   on the GPU). With float activations left unrounded, the two graphs differed by up to 0.07
//!   in a probability on phantoms and 0.72 on a real CT, whose status changed
//!   (BENCHMARKS.md "GPU");
//! - a `QuantizeLinear` feeding only `DequantizeLinear`s (a Q/DQ pair between float ops)
//!   becomes that rounding;
//! - any other quantized op (`QLinearMatMul`, `ConvInteger`, a lone `QuantizeLinear`, ...)
//!   makes the rewrite fail with [`DequantizeError::Unsupported`] naming the node.
//!
//! Which graph a runtime runs is [`GraphChoice`] (`inference.graph`, `infer --graph`):
//! `auto` is dequantized on CUDA, and on the CPU whichever of the two runs a start-up probe faster. The agreement of the two graphs on the
//! CPU is in BENCHMARKS.md ("GPU") and models/MODEL_CARD.md.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, ModelProto, NodeProto, TensorProto};

/// Which graph of the model file to run (`inference.graph`, `infer --graph`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum GraphChoice {
    /// Dequantized on CUDA; on the CPU int8 or dequantized, whichever runs a start-up
    /// probe faster.
    #[default]
    Auto,
    /// The file as shipped (int8 convolutions).
    Int8,
    /// The file rewritten to float at load (see the module doc).
    Dequantized,
}

/// The graph one runtime runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graph {
    Int8,
    Dequantized,
}

impl Graph {
    pub fn name(self) -> &'static str {
        match self {
            Graph::Int8 => "int8",
            Graph::Dequantized => "dequantized",
        }
    }
}

impl GraphChoice {
    /// The graph for the CPU (`cuda == false`) or for CUDA.
    pub fn for_runtime(self, cuda: bool) -> Graph {
        match self {
            GraphChoice::Auto if cuda => Graph::Dequantized,
            GraphChoice::Auto | GraphChoice::Int8 => Graph::Int8,
            GraphChoice::Dequantized => Graph::Dequantized,
        }
    }
}

/// Why the graph could not be dequantized.
#[derive(Debug, thiserror::Error)]
pub enum DequantizeError {
    #[error("node {node:?} ({op}) cannot be dequantized: {why}")]
    Unsupported {
        node: String,
        op: String,
        why: &'static str,
    },
    #[error("node {node:?}: input {tensor:?} is not an initializer of the graph")]
    NotConstant { node: String, tensor: String },
    #[error("tensor {tensor:?}: {why}")]
    BadTensor { tensor: String, why: String },
    #[error("the ONNX model has no graph")]
    NoGraph,
}

/// What the rewrite did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewritten {
    /// `QLinearConv` -> `Conv`.
    pub convs: usize,
    /// Q/DQ pairs -> float rounding to the quantization grid.
    pub pairs: usize,
}

/// Ops that carry quantized tensors; none may be left after the rewrite.
const QUANTIZED_OPS: &[&str] = &[
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearSoftmax",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearLeakyRelu",
];

/// Rewrites `model` in place into its float graph (see the module doc).
pub fn dequantize(model: &mut ModelProto) -> Result<Rewritten, DequantizeError> {
    let graph = model.graph.as_mut().ok_or(DequantizeError::NoGraph)?;
    let inits: HashMap<String, TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    let producer: HashMap<String, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();
    let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for input in &n.input {
            consumers.entry(input.clone()).or_default().push(i);
        }
    }
    let graph_outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();

    let mut rewritten = Rewritten::default();
    let mut removed: HashSet<usize> = HashSet::new();
    let mut replaced: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    // By conv index: the clip of that conv's input.
    let mut input_clips: HashMap<usize, Vec<NodeProto>> = HashMap::new();

    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type != "QLinearConv" || !node.domain.is_empty() {
            continue;
        }
        let unsupported = |why| DequantizeError::Unsupported {
            node: node.name.clone(),
            op: node.op_type.clone(),
            why,
        };
        if node.input.len() < 8 || node.output.len() != 1 {
            return Err(unsupported("expected 8 or 9 inputs and one output"));
        }
        let x_float = match producer.get(&node.input[0]).map(|&p| &graph.node[p]) {
            Some(q) if q.op_type == "QuantizeLinear" => q.input[0].clone(),
            _ => return Err(unsupported("its input does not come from a QuantizeLinear")),
        };
        let names = [node.input[1].as_str(), node.input[2].as_str()];
        let x_range = quantized_range(&inits, &node.name, names)?;
        let names = [node.input[6].as_str(), node.input[7].as_str()];
        let y_range = quantized_range(&inits, &node.name, names)?;
        let users = consumers.get(&node.output[0]).cloned().unwrap_or_default();
        if graph_outputs.contains(&node.output[0])
            || users.len() != 1
            || graph.node[users[0]].op_type != "DequantizeLinear"
        {
            return Err(unsupported(
                "its output does not go to exactly one DequantizeLinear",
            ));
        }
        let dq = users[0];
        let constant = |k: usize| {
            inits
                .get(&node.input[k])
                .ok_or_else(|| DequantizeError::NotConstant {
                    node: node.name.clone(),
                    tensor: node.input[k].clone(),
                })
        };
        let x_scale = scalar(constant(1)?)?;
        let w = constant(3)?;
        let w_q = values(w)?;
        let w_scale = values(constant(4)?)?;
        let w_zp = values(constant(5)?)?;
        let out_channels = *w.dims.first().ok_or_else(|| DequantizeError::BadTensor {
            tensor: w.name.clone(),
            why: "weights without dimensions".into(),
        })? as usize;
        let per_channel = |v: &[f64], what: &str| -> Result<Vec<f64>, DequantizeError> {
            match v.len() {
                1 => Ok(vec![v[0]; out_channels]),
                n if n == out_channels => Ok(v.to_vec()),
                n => Err(DequantizeError::BadTensor {
                    tensor: w.name.clone(),
                    why: format!("{what} has {n} values for {out_channels} output channels"),
                }),
            }
        };
        let w_scale = per_channel(&w_scale, "w_scale")?;
        let w_zp = per_channel(&w_zp, "w_zero_point")?;
        if out_channels == 0 || w_q.len() % out_channels != 0 {
            return Err(DequantizeError::BadTensor {
                tensor: w.name.clone(),
                why: format!("{} values for {out_channels} output channels", w_q.len()),
            });
        }
        let per_out = w_q.len() / out_channels;
        let weights: Vec<f32> = w_q
            .iter()
            .enumerate()
            .map(|(k, &q)| {
                let m = k / per_out;
                (w_scale[m] * (q - w_zp[m])) as f32
            })
            .collect();
        let w_name = format!("{}_dequantized", w.name);
        new_inits.push(float_tensor(&w_name, &w.dims, &weights));
        let x_clipped = format!("{}_input_rounded", node.name);
        input_clips.insert(
            i,
            round_to_grid(&x_float, &x_clipped, x_range, &mut new_inits),
        );
        let mut conv_inputs = vec![x_clipped, w_name];
        if let Some(b_name) = node.input.get(8).filter(|s| !s.is_empty()) {
            let b = constant(8)?;
            let b_q = values(b)?;
            if b_q.len() != out_channels {
                return Err(DequantizeError::BadTensor {
                    tensor: b.name.clone(),
                    why: format!("{} bias values for {out_channels} channels", b_q.len()),
                });
            }
            let bias: Vec<f32> = b_q
                .iter()
                .zip(&w_scale)
                .map(|(&q, &s)| (q * x_scale * s) as f32)
                .collect();
            let b_float = format!("{b_name}_dequantized");
            new_inits.push(float_tensor(&b_float, &[out_channels as i64], &bias));
            conv_inputs.push(b_float);
        }
        let conv_out = format!("{}_float", node.name);
        replaced.insert(
            i,
            vec![NodeProto {
                input: conv_inputs,
                output: vec![conv_out.clone()],
                name: node.name.clone(),
                op_type: "Conv".into(),
                attribute: node.attribute.clone(),
                ..NodeProto::default()
            }],
        );
        let dq_out = &graph.node[dq].output[0];
        replaced.insert(
            dq,
            round_to_grid(&conv_out, dq_out, y_range, &mut new_inits),
        );
        rewritten.convs += 1;
    }

    // QuantizeLinear nodes: gone when every reader was rewritten; Identity when every
    // remaining reader is a DequantizeLinear (the pair then reads the float tensor).
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type != "QuantizeLinear" {
            continue;
        }
        let users = consumers.get(&node.output[0]).cloned().unwrap_or_default();
        let left: Vec<usize> = users
            .into_iter()
            .filter(|u| !replaced.contains_key(u))
            .collect();
        if graph_outputs.contains(&node.output[0]) {
            continue; // reported below as left over
        }
        if left.is_empty() {
            removed.insert(i);
        } else if left
            .iter()
            .all(|&u| graph.node[u].op_type == "DequantizeLinear")
        {
            let names = [node.input[1].as_str(), node.input[2].as_str()];
            let range = quantized_range(&inits, &node.name, names)?;
            for u in left {
                let dq_out = &graph.node[u].output[0];
                replaced.insert(
                    u,
                    round_to_grid(&node.input[0], dq_out, range, &mut new_inits),
                );
                rewritten.pairs += 1;
            }
            removed.insert(i);
        }
    }

    let old = std::mem::take(&mut graph.node);
    let mut nodes = Vec::with_capacity(old.len() + input_clips.len());
    for (i, n) in old.into_iter().enumerate() {
        // A conv's input clip goes just before it (its input is produced earlier).
        nodes.extend(input_clips.remove(&i).unwrap_or_default());
        if !removed.contains(&i) {
            nodes.extend(replaced.remove(&i).unwrap_or_else(|| vec![n]));
        }
    }
    graph.node = nodes;
    if let Some(left) = graph
        .node
        .iter()
        .find(|n| QUANTIZED_OPS.contains(&n.op_type.as_str()))
    {
        return Err(DequantizeError::Unsupported {
            node: left.name.clone(),
            op: left.op_type.clone(),
            why: "only QLinearConv between QuantizeLinear and DequantizeLinear, and Q/DQ \
                  pairs, are rewritten",
        });
    }
    graph.initializer.extend(new_inits);
    // Drop what nothing reads any more (the int8 weights, scales, zero points).
    let read: HashSet<&String> = graph.node.iter().flat_map(|n| n.input.iter()).collect();
    let produced: HashSet<&String> = graph.node.iter().flat_map(|n| n.output.iter()).collect();
    graph
        .initializer
        .retain(|t| read.contains(&t.name) || graph_outputs.contains(&t.name));
    graph
        .value_info
        .retain(|v| produced.contains(&v.name) || read.contains(&v.name));
    Ok(rewritten)
}

/// `output = scale * clip(round(input / scale), lo, hi)` (`range` = (scale, lo, hi)): what a
/// `QuantizeLinear` + `DequantizeLinear` pair computes, in float ops. Its constants become
/// initializers.
fn round_to_grid(
    input: &str,
    output: &str,
    (scale, lo, hi): (f32, f32, f32),
    inits: &mut Vec<TensorProto>,
) -> Vec<NodeProto> {
    let name = |what: &str| format!("{output}_{what}");
    for (what, v) in [("scale", scale), ("q_min", lo), ("q_max", hi)] {
        inits.push(float_tensor(&name(what), &[], &[v]));
    }
    let node = |op: &str, inputs: &[String], out: String| NodeProto {
        input: inputs.to_vec(),
        output: vec![out.clone()],
        name: out,
        op_type: op.into(),
        attribute: Vec::<AttributeProto>::new(),
        ..NodeProto::default()
    };
    vec![
        node("Div", &[input.into(), name("scale")], name("scaled")),
        node("Round", &[name("scaled")], name("rounded")),
        node(
            "Clip",
            &[name("rounded"), name("q_min"), name("q_max")],
            name("clipped"),
        ),
        node("Mul", &[name("clipped"), name("scale")], output.into()),
    ]
}

/// `(scale, q_min - zp, q_max - zp)` of a per-tensor (scale, zero point) pair, with q in u8
/// or i8 by the zero point's type.
fn quantized_range(
    inits: &HashMap<String, TensorProto>,
    node: &str,
    [scale, zero_point]: [&str; 2],
) -> Result<(f32, f32, f32), DequantizeError> {
    let get = |name: &str| {
        inits.get(name).ok_or_else(|| DequantizeError::NotConstant {
            node: node.to_string(),
            tensor: name.to_string(),
        })
    };
    let s = scalar(get(scale)?)?;
    let zp_t = get(zero_point)?;
    let zp = scalar(zp_t)?;
    let (q_min, q_max) = match DataType::try_from(zp_t.data_type) {
        Ok(DataType::Uint8) => (0.0, 255.0),
        Ok(DataType::Int8) => (-128.0, 127.0),
        other => {
            return Err(DequantizeError::BadTensor {
                tensor: zero_point.to_string(),
                why: format!("zero point of type {other:?} (expected uint8 or int8)"),
            })
        }
    };
    Ok((s as f32, (q_min - zp) as f32, (q_max - zp) as f32))
}

fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        name: name.to_string(),
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..TensorProto::default()
    }
}

/// The values of a float, int8, uint8 or int32 initializer (raw or typed storage).
fn values(t: &TensorProto) -> Result<Vec<f64>, DequantizeError> {
    let bad = |why: String| DequantizeError::BadTensor {
        tensor: t.name.clone(),
        why,
    };
    if !t.external_data.is_empty() {
        return Err(bad("external data is not supported".into()));
    }
    let count: i64 = t.dims.iter().product();
    let raw = &t.raw_data;
    let v: Vec<f64> = match DataType::try_from(t.data_type) {
        Ok(DataType::Float) if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Ok(DataType::Float) => t.float_data.iter().map(|&x| x as f64).collect(),
        Ok(DataType::Int8) if !raw.is_empty() => raw.iter().map(|&b| b as i8 as f64).collect(),
        Ok(DataType::Uint8) if !raw.is_empty() => raw.iter().map(|&b| b as f64).collect(),
        Ok(DataType::Int32) if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Ok(DataType::Int8 | DataType::Uint8 | DataType::Int32) => {
            t.int32_data.iter().map(|&x| x as f64).collect()
        }
        other => return Err(bad(format!("unsupported data type {other:?}"))),
    };
    if v.len() as i64 != count {
        return Err(bad(format!(
            "{} values for dimensions {:?}",
            v.len(),
            t.dims
        )));
    }
    Ok(v)
}

fn scalar(t: &TensorProto) -> Result<f64, DequantizeError> {
    match values(t)?.as_slice() {
        [x] => Ok(*x),
        v => Err(DequantizeError::BadTensor {
            tensor: t.name.clone(),
            why: format!("expected one value, found {}", v.len()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::Framework;

    #[test]
    fn auto_is_dequantized_on_cuda_only() {
        assert_eq!(GraphChoice::Auto.for_runtime(true), Graph::Dequantized);
        assert_eq!(GraphChoice::Auto.for_runtime(false), Graph::Int8);
        assert_eq!(GraphChoice::Int8.for_runtime(true), Graph::Int8);
        assert_eq!(
            GraphChoice::Dequantized.for_runtime(false),
            Graph::Dequantized
        );
    }

    #[test]
    fn shipped_model_has_no_quantized_op_left() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/cspine_triage_int8.onnx"
        );
        let mut proto = tract_onnx::onnx().proto_model_for_path(path).unwrap();
        let before = proto.graph.as_ref().unwrap().node.len();
        let done = dequantize(&mut proto).unwrap();
        assert_eq!(done, Rewritten { convs: 8, pairs: 0 });
        let graph = proto.graph.as_ref().unwrap();
        // 8 QLinearConv -> Conv, 8 DequantizeLinear -> 4 rounding ops each, 7 QuantizeLinear
        // gone, 8 input roundings of 4 ops added.
        assert_eq!(graph.node.len(), before + 24 + 32 - 7);
        let rounds = graph.node.iter().filter(|n| n.op_type == "Round").count();
        assert_eq!(rounds, 16);
        assert!(graph
            .node
            .iter()
            .all(|n| !QUANTIZED_OPS.contains(&n.op_type.as_str())));
        assert!(graph
            .initializer
            .iter()
            .all(|t| t.data_type != DataType::Int8 as i32));
    }

    #[test]
    fn qlinearconv_read_elsewhere_is_refused() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/cspine_triage_int8.onnx"
        );
        let mut proto = tract_onnx::onnx().proto_model_for_path(path).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        // A QLinearConv whose output is read by something other than a DequantizeLinear.
        let conv = graph
            .node
            .iter()
            .position(|n| n.op_type == "QLinearConv")
            .unwrap();
        let out = graph.node[conv].output[0].clone();
        graph.node.push(NodeProto {
            input: vec![out],
            output: vec!["extra".into()],
            name: "extra".into(),
            op_type: "Identity".into(),
            ..NodeProto::default()
        });
        let err = dequantize(&mut proto).unwrap_err();
        assert!(matches!(err, DequantizeError::Unsupported { ref op, .. } if op == "QLinearConv"));
    }
}
