//! Writes batchgen's own GPT-2 graph (ONNX, opset 17 + `com.microsoft`).
//!
//! Inputs: `input_ids`, `position_ids` `[B, S]` (int64); `seqlens_k` `[B]`
//! (int32, each row's total length minus one); `total_sequence_length` `[1]`
//! (int32); `logits_index` `[N]` (int64, flat indices into the `B × S`
//! positions whose logits are wanted); `past_key.{i}`/`past_value.{i}`
//! `[B, heads, MAX, head_dim]`. Outputs: `logits` `[N, vocab]` and
//! `present_key.{i}`/`present_value.{i}`, which the engine binds to the same
//! memory as the past (GroupQueryAttention then writes each new key/value in
//! place and copies nothing).
//!
//! Per layer: LayerNormalization (first layer) or SkipLayerNormalization
//! (later ones, folding the residual add and the previous MLP's bias),
//! Gemm for the QKV projection with its bias, GroupQueryAttention on the
//! packed QKV, MatMul for the output projection whose bias goes into the
//! next SkipLayerNormalization, MatMul + FastGelu (bias fused) for the MLP.
//! The last layer gathers the `logits_index` rows right after its attention
//! (its keys and values are cached by then), so its output projection, MLP,
//! the final LayerNorm and the LM head (Gemm against the tied embedding,
//! transposed in the kernel) run on those rows only.
//!
//! With int8 weights (`quant`) each of those MatMuls (and the LM head, when
//! it is quantized too) is a `DynamicQuantizeMatMul` instead.
//!
//! With batchgen's own attention kernel (`Kernel::Slot`, which a float16
//! cache needs) each layer's GroupQueryAttention is a `batchgen.SlotAttention`
//! instead: it takes one more input, `past_lens [B]` (int32, what each row's
//! cache held before the run), writes the new keys and values into the past
//! buffers it is given, and has no present outputs. With the paged cache
//! (`Kernel::Paged`) it is a `batchgen.PagedAttention`, whose past inputs
//! are the whole block pool `[blocks, heads, block, head_dim]` and which
//! takes one input more, `block_table [B, T]` (int32, `super::pool`).
use super::attention;
use super::cache::KvDtype;
use super::greedy;
use super::onnx::{self, tensor_proto::DataType};
use super::quant;
use super::weights::{Activation, Elem, Gpt2Shape, Weights};
use super::{Kernel, KvLayout};

/// Name of the in-memory "file" the weight initializers point into.
pub const WEIGHTS_FILE: &str = "batchgen-weights.bin";

pub fn past_names(layer: usize) -> (String, String) {
    (format!("past_key.{layer}"), format!("past_value.{layer}"))
}

pub fn present_names(layer: usize) -> (String, String) {
    (format!("present_key.{layer}"), format!("present_value.{layer}"))
}

struct Graph {
    nodes: Vec<onnx::NodeProto>,
    initializers: Vec<onnx::TensorProto>,
}

fn attr_i(name: &str, i: i64) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: Some(name.into()),
        r#type: Some(onnx::attribute_proto::AttributeType::Int as i32),
        i: Some(i),
        ..Default::default()
    }
}

fn attr_f(name: &str, f: f32) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: Some(name.into()),
        r#type: Some(onnx::attribute_proto::AttributeType::Float as i32),
        f: Some(f),
        ..Default::default()
    }
}

fn value_info(name: &str, dtype: DataType, dims: &[Result<i64, &str>]) -> onnx::ValueInfoProto {
    use onnx::tensor_shape_proto::{Dimension, dimension::Value};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Ok(n) => Value::DimValue(*n),
                Err(s) => Value::DimParam((*s).into()),
            }),
            ..Default::default()
        })
        .collect();
    onnx::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(onnx::type_proto::Tensor {
                elem_type: Some(dtype as i32),
                shape: Some(onnx::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Graph {
    fn node(&mut self, op: &str, domain: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<onnx::AttributeProto>) {
        let name = format!("{op}_{}", self.nodes.len());
        self.nodes.push(onnx::NodeProto {
            op_type: Some(op.into()),
            domain: (!domain.is_empty()).then(|| domain.into()),
            name: Some(name),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        });
    }

    /// A small int64 constant, stored inline.
    fn int64s(&mut self, name: &str, values: &[i64]) {
        self.initializers.push(onnx::TensorProto {
            name: Some(name.into()),
            data_type: Some(DataType::Int64 as i32),
            dims: vec![values.len() as i64],
            raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()),
            ..Default::default()
        });
    }

    /// A weight: an initializer whose data lies in the shared buffer.
    fn weight(&mut self, weights: &Weights, name: &str) -> String {
        let slice = &weights.index[name];
        let entry = |k: &str, v: String| onnx::StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        let dtype = match slice.elem {
            Elem::F32 => DataType::Float,
            Elem::I8 => DataType::Int8,
        };
        self.initializers.push(onnx::TensorProto {
            name: Some(name.into()),
            data_type: Some(dtype as i32),
            dims: slice.dims.iter().map(|&d| d as i64).collect(),
            data_location: Some(onnx::tensor_proto::DataLocation::External as i32),
            external_data: vec![
                entry("location", WEIGHTS_FILE.into()),
                entry("offset", slice.offset.to_string()),
                entry("length", slice.bytes().to_string()),
            ],
            ..Default::default()
        });
        name.to_string()
    }

    /// `out = input × W (+ bias)`: a MatMul (Gemm with a bias) for a float32
    /// weight, a DynamicQuantizeMatMul (bias fused) for an int8 one.
    fn matmul(&mut self, weights: &Weights, input: &str, w: &str, bias: Option<&str>, out: &str) {
        if weights.index[w].elem == Elem::I8 {
            let (q, s) = (self.weight(weights, w), self.weight(weights, &quant::scale_name(w)));
            let b = bias.map(|b| self.weight(weights, b));
            let mut inputs = vec![input, &q, &s];
            if let Some(b) = &b {
                inputs.extend(["", b]);
            }
            self.node("DynamicQuantizeMatMul", "com.microsoft", &inputs, &[out], vec![]);
            return;
        }
        let w = self.weight(weights, w);
        match bias.map(|b| self.weight(weights, b)) {
            Some(b) => self.node("Gemm", "", &[input, &w, &b], &[out], vec![]),
            None => self.node("MatMul", "", &[input, &w], &[out], vec![]),
        }
    }
}

/// The serialized model. Its weights are external: pass `weights.data` to
/// the session as the in-memory file `WEIGHTS_FILE`.
pub fn build(shape: &Gpt2Shape, weights: &Weights, kv: KvLayout) -> Vec<u8> {
    use prost::Message;
    let mut g = Graph { nodes: Vec::new(), initializers: Vec::new() };
    let (e, heads) = (shape.width as i64, shape.heads as i64);
    let ms = "com.microsoft";
    let eps = || attr_f("epsilon", shape.epsilon);
    let wte = g.weight(weights, "wte.weight");
    let wpe = g.weight(weights, "wpe.weight");
    g.int64s("c_3e", &[3 * e]);
    g.int64s("c_flat", &[-1, e]);
    g.node("Shape", "", &["input_ids"], &["batch_seq"], vec![]);
    g.node("Concat", "", &["batch_seq", "c_3e"], &["qkv_shape"], vec![attr_i("axis", 0)]);
    g.node("Gather", "", &[&wte, "input_ids"], &["tok_emb"], vec![]);
    g.node("Gather", "", &[&wpe, "position_ids"], &["pos_emb"], vec![]);
    g.node("Add", "", &["tok_emb", "pos_emb"], &["emb"], vec![]);
    g.node("Reshape", "", &["emb", "c_flat"], &["h0"], vec![]);

    // (MLP output without its bias, residual, MLP bias) of the previous layer.
    let mut carry: Option<(String, String, String)> = None;
    for i in 0..shape.layers {
        let w = |s: &str| format!("h.{i}.{s}");
        let ln1 = format!("l{i}_ln1");
        let mut residual = format!("l{i}_res1");
        let (g1, b1) = (g.weight(weights, &w("ln_1.weight")), g.weight(weights, &w("ln_1.bias")));
        match carry.take() {
            None => {
                g.node("LayerNormalization", "", &["h0", &g1, &b1], &[&ln1], vec![attr_i("axis", -1), eps()]);
                residual = "h0".into();
            }
            Some((mlp, prev_res, bias)) => {
                g.node(
                    "SkipLayerNormalization",
                    ms,
                    &[&mlp, &prev_res, &g1, &b1, &bias],
                    &[&ln1, "", "", &residual],
                    vec![eps()],
                );
            }
        }
        let qkv = format!("l{i}_qkv");
        g.matmul(weights, &ln1, &w("attn.c_attn.weight"), Some(&w("attn.c_attn.bias")), &qkv);
        let qkv3 = format!("l{i}_qkv3");
        g.node("Reshape", "", &[&qkv, "qkv_shape"], &[&qkv3], vec![]);
        let (pk, pv) = past_names(i);
        let (ok, ov) = present_names(i);
        let attn3 = format!("l{i}_attn3");
        match kv.kernel {
            Kernel::GroupQuery => g.node(
                "GroupQueryAttention",
                ms,
                &[&qkv3, "", "", &pk, &pv, "seqlens_k", "total_sequence_length"],
                &[&attn3, &ok, &ov],
                vec![attr_i("num_heads", heads), attr_i("kv_num_heads", heads), attr_f("scale", shape.scales[i])],
            ),
            Kernel::Slot => g.node(
                attention::OP,
                attention::DOMAIN,
                &[&qkv3, &pk, &pv, "seqlens_k", "past_lens"],
                &[&attn3],
                vec![attr_i("num_heads", heads), attr_f("scale", shape.scales[i])],
            ),
            Kernel::Paged => g.node(
                attention::PAGED_OP,
                attention::DOMAIN,
                &[&qkv3, &pk, &pv, "seqlens_k", "past_lens", "block_table"],
                &[&attn3],
                vec![attr_i("num_heads", heads), attr_f("scale", shape.scales[i])],
            ),
        }
        let mut attn = format!("l{i}_attn");
        g.node("Reshape", "", &[&attn3, "c_flat"], &[&attn], vec![]);
        if i + 1 == shape.layers {
            // The last layer's keys and values are in the cache now; what
            // follows is row-wise and feeds only the logits, so it runs on
            // the `logits_index` rows alone (llama.cpp's `inp_out_ids`):
            // a 32-token prompt skips 31/32 of that layer's MLP.
            let (kept_attn, kept_res) = (format!("l{i}_attn_kept"), format!("l{i}_res1_kept"));
            g.node("Gather", "", &[&attn, "logits_index"], &[&kept_attn], vec![attr_i("axis", 0)]);
            g.node("Gather", "", &[&residual, "logits_index"], &[&kept_res], vec![attr_i("axis", 0)]);
            (attn, residual) = (kept_attn, kept_res);
        }
        let proj = format!("l{i}_proj");
        g.matmul(weights, &attn, &w("attn.c_proj.weight"), None, &proj);
        let (g2, b2, bo) = (
            g.weight(weights, &w("ln_2.weight")),
            g.weight(weights, &w("ln_2.bias")),
            g.weight(weights, &w("attn.c_proj.bias")),
        );
        let (ln2, res2) = (format!("l{i}_ln2"), format!("l{i}_res2"));
        g.node("SkipLayerNormalization", ms, &[&proj, &residual, &g2, &b2, &bo], &[&ln2, "", "", &res2], vec![eps()]);
        let bfc = g.weight(weights, &w("mlp.c_fc.bias"));
        let (fc, act) = (format!("l{i}_fc"), format!("l{i}_act"));
        g.matmul(weights, &ln2, &w("mlp.c_fc.weight"), None, &fc);
        match shape.activation {
            Activation::GeluTanh => g.node("FastGelu", ms, &[&fc, &bfc], &[&act], vec![]),
            Activation::GeluErf => g.node("BiasGelu", ms, &[&fc, &bfc], &[&act], vec![]),
        }
        let mlp = format!("l{i}_mlp");
        g.matmul(weights, &act, &w("mlp.c_proj.weight"), None, &mlp);
        carry = Some((mlp, res2, g.weight(weights, &w("mlp.c_proj.bias"))));
    }
    let (mlp, res, bias) = carry.expect("at least one layer");
    let (gf, bf) = (g.weight(weights, "ln_f.weight"), g.weight(weights, "ln_f.bias"));
    g.node("SkipLayerNormalization", ms, &[&mlp, &res, &gf, &bf, &bias], &["picked"], vec![eps()]);
    if weights.index.contains_key(quant::LM_HEAD) {
        g.matmul(weights, "picked", quant::LM_HEAD, None, "logits");
    } else {
        g.node("Gemm", "", &["picked", &wte], &["logits"], vec![attr_i("transB", 1)]);
    }

    // Our kernels' graphs choose each row's greedy token in the run too
    // (`greedy`), on ONNX Runtime's threads.
    let ours = kv.kernel != Kernel::GroupQuery;
    if ours {
        g.node(greedy::OP, attention::DOMAIN, &["logits"], &[greedy::IDS, greedy::LSE], vec![]);
    }
    let (d, mx) = (shape.head_dim() as i64, "max_len");
    let kv_type = match kv.dtype {
        KvDtype::Fp32 => DataType::Float,
        KvDtype::Fp16 => DataType::Float16,
    };
    let cache = |name: &str| match kv.kernel {
        Kernel::Paged => value_info(name, kv_type, &[Err("pool_blocks"), Ok(heads), Err("block"), Ok(d)]),
        _ => value_info(name, kv_type, &[Err("batch"), Ok(heads), Err(mx), Ok(d)]),
    };
    let mut inputs = vec![
        value_info("input_ids", DataType::Int64, &[Err("batch"), Err("seq")]),
        value_info("position_ids", DataType::Int64, &[Err("batch"), Err("seq")]),
        value_info("seqlens_k", DataType::Int32, &[Err("batch")]),
        value_info("total_sequence_length", DataType::Int32, &[Ok(1)]),
        value_info("logits_index", DataType::Int64, &[Err("picked")]),
    ];
    if kv.kernel != Kernel::GroupQuery {
        inputs.push(value_info("past_lens", DataType::Int32, &[Err("batch")]));
    }
    if kv.kernel == Kernel::Paged {
        inputs.push(value_info("block_table", DataType::Int32, &[Err("batch"), Err("table")]));
    }
    let mut outputs = vec![value_info("logits", DataType::Float, &[Err("picked"), Ok(shape.vocab as i64)])];
    if ours {
        outputs.push(value_info(greedy::IDS, DataType::Int32, &[Err("picked")]));
        outputs.push(value_info(greedy::LSE, DataType::Double, &[Err("picked")]));
    }
    for i in 0..shape.layers {
        let ((pk, pv), (ok, ov)) = (past_names(i), present_names(i));
        inputs.extend([cache(&pk), cache(&pv)]);
        if kv.kernel == Kernel::GroupQuery {
            outputs.extend([cache(&ok), cache(&ov)]);
        }
    }
    let model = onnx::ModelProto {
        ir_version: Some(8),
        producer_name: Some("batchgen".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import: vec![
            onnx::OperatorSetIdProto { domain: Some(String::new()), version: Some(17) },
            onnx::OperatorSetIdProto { domain: Some(ms.into()), version: Some(1) },
            onnx::OperatorSetIdProto { domain: Some(attention::DOMAIN.into()), version: Some(1) },
        ],
        graph: Some(onnx::GraphProto {
            name: Some("batchgen-gpt2".into()),
            node: g.nodes,
            initializer: g.initializers,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}

/// A one-node graph `y[m, n] = x[m, k] × W[k, n]` for measuring the GEMMs a
/// step runs (`batchgen bench --roofline`): a float32 MatMul, or with
/// `int8` the DynamicQuantizeMatMul the int8 graph uses (one scale per
/// column). `m` is left dynamic; W is filled with a fixed pattern.
pub fn matmul_probe(k: usize, n: usize, int8: bool) -> Vec<u8> {
    let pattern = |i: usize| ((i * 2_654_435_761) % 255) as i64 - 127;
    if int8 {
        let q: Vec<i8> = (0..k * n).map(|i| pattern(i) as i8).collect();
        int8_matmul(k, n, &q, &vec![0.02 / 127.0; n])
    } else {
        let w: Vec<f32> = (0..k * n).map(|i| pattern(i) as f32 * 1.6e-4).collect();
        matmul_graph(k, n, ProbeWeights::Fp32(&w))
    }
}

/// The int8 graph's DynamicQuantizeMatMul alone, over the given int8
/// weights `q [k, n]` and column scales (tests check ONNX Runtime's
/// integer kernels on them).
pub fn int8_matmul(k: usize, n: usize, q: &[i8], scale: &[f32]) -> Vec<u8> {
    matmul_graph(k, n, ProbeWeights::Int8(q, scale))
}

enum ProbeWeights<'a> {
    Fp32(&'a [f32]),
    Int8(&'a [i8], &'a [f32]),
}

fn matmul_graph(k: usize, n: usize, weights: ProbeWeights<'_>) -> Vec<u8> {
    use prost::Message;
    let mut g = Graph { nodes: Vec::new(), initializers: Vec::new() };
    let tensor = |name: &str, dtype: DataType, dims: Vec<i64>, raw: Vec<u8>| onnx::TensorProto {
        name: Some(name.into()),
        data_type: Some(dtype as i32),
        dims,
        raw_data: Some(raw.into()),
        ..Default::default()
    };
    let floats = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    match weights {
        ProbeWeights::Int8(q, scale) => {
            assert_eq!((q.len(), scale.len()), (k * n, n));
            g.initializers.push(tensor(
                "w",
                DataType::Int8,
                vec![k as i64, n as i64],
                q.iter().map(|&x| x as u8).collect(),
            ));
            g.initializers.push(tensor("w_scale", DataType::Float, vec![n as i64], floats(scale)));
            g.node("DynamicQuantizeMatMul", "com.microsoft", &["x", "w", "w_scale"], &["y"], vec![]);
        }
        ProbeWeights::Fp32(w) => {
            assert_eq!(w.len(), k * n);
            g.initializers.push(tensor("w", DataType::Float, vec![k as i64, n as i64], floats(w)));
            g.node("MatMul", "", &["x", "w"], &["y"], vec![]);
        }
    }
    let model = onnx::ModelProto {
        ir_version: Some(8),
        producer_name: Some("batchgen".into()),
        opset_import: vec![
            onnx::OperatorSetIdProto { domain: Some(String::new()), version: Some(17) },
            onnx::OperatorSetIdProto { domain: Some("com.microsoft".into()), version: Some(1) },
        ],
        graph: Some(onnx::GraphProto {
            name: Some("batchgen-matmul-probe".into()),
            node: g.nodes,
            initializer: g.initializers,
            input: vec![value_info("x", DataType::Float, &[Err("m"), Ok(k as i64)])],
            output: vec![value_info("y", DataType::Float, &[Err("m"), Ok(n as i64)])],
            ..Default::default()
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}
