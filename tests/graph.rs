//! batchgen's own graph against the optimum export it was read from: the
//! logits of the built graph over the slot cache (whole prompts, chunked
//! prompts, decode steps of rows at different lengths in non-adjacent slots,
//! copied slots) equal a full recompute of the exported graph within 1e-4,
//! with ONNX Runtime's GroupQueryAttention and with batchgen's own attention
//! kernel over a float32 cache; over a float16 cache within what rounding
//! the keys and values to float16 costs.
mod common;

use batchgen::engine::SessionOptions;
use batchgen::graph::{BuiltModel, Gpt2Shape, Kernel, KvDtype, KvLayout, RowInput, SharedModel, Weights};

const LAYOUTS: [KvLayout; 3] = [
    KvLayout { dtype: KvDtype::Fp32, kernel: Kernel::GroupQuery },
    KvLayout { dtype: KvDtype::Fp32, kernel: Kernel::Slot },
    KvLayout { dtype: KvDtype::Fp16, kernel: Kernel::Slot },
];

fn paged(kv: KvLayout, blocks: usize, block: usize) -> batchgen::graph::PagedModel {
    let rt = batchgen::runtime::init(None).unwrap();
    let dir = common::fixture_dir();
    let shape = Gpt2Shape::load(&dir.join("config.json")).unwrap();
    let weights = Weights::from_onnx(&dir.join("model.onnx"), &shape).unwrap();
    let shared = SharedModel::new(shape, weights, kv);
    let session = std::sync::Arc::new(shared.session(&rt.env, &SessionOptions { intra_op_threads: 2 }).unwrap());
    shared.paged_worker(&session, blocks, block).unwrap()
}

fn built(slots: usize, kv: KvLayout) -> (BuiltModel, Gpt2Shape) {
    let rt = batchgen::runtime::init(None).unwrap();
    let dir = common::fixture_dir();
    let shape = Gpt2Shape::load(&dir.join("config.json")).unwrap();
    let weights = Weights::from_onnx(&dir.join("model.onnx"), &shape).unwrap();
    let shared = SharedModel::new(shape.clone(), weights, kv);
    let session = std::sync::Arc::new(shared.session(&rt.env, &SessionOptions { intra_op_threads: 2 }).unwrap());
    (shared.worker(&session, slots).unwrap(), shape)
}

/// Largest |built - exported| allowed: float32 rounding, or float16 keys
/// and values (measured about 2e-3 on the fixture).
fn tolerance(kv: KvLayout) -> f32 {
    match kv.dtype {
        KvDtype::Fp32 => 1e-4,
        KvDtype::Fp16 => 2e-2,
    }
}

/// The largest difference seen, per layout (so a float16 run can show it
/// really rounded).
fn assert_close(got: &[f32], want: &[f32], kv: KvLayout, what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}");
    let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(err < tolerance(kv), "{kv:?} {what}: max |built - exported| = {err}");
    err
}

/// Three prompts of different lengths (one of them chunked), then decode
/// steps of all three together, each compared with the export's full
/// recompute of the same tokens.
#[test]
fn built_graph_logits_equal_the_exported_graph() {
    for kv in LAYOUTS {
        let worst = logits_over_chunks_and_decode_steps(kv);
        eprintln!("{kv:?}: max |built - exported| = {worst}");
        if kv.dtype == KvDtype::Fp16 {
            assert!(worst > 1e-6, "a float16 cache rounds the keys and values");
        }
    }
}

fn logits_over_chunks_and_decode_steps(kv: KvLayout) -> f32 {
    let mut worst = 0.0f32;
    let (mut model, shape) = built(6, kv);
    let mut session = common::fixture_session();
    let prompts: Vec<Vec<u32>> =
        vec![vec![464, 2068, 7586, 21831], (0..57).map(|i| (i * 733 + 11) % 50257).collect(), vec![50256]];
    // Slots 0, 2 and 5: holes in between.
    let slots = [0usize, 2, 5];
    let mut seqs: Vec<Vec<u32>> = prompts.clone();
    let mut last = Vec::new();
    for (p, &slot) in prompts.iter().zip(&slots) {
        // Prefill in chunks of 20 tokens: one row per run, on its own slot.
        let mut logits = None;
        for (c, chunk) in p.chunks(20).enumerate() {
            let row = RowInput { tokens: chunk, past: c * 20, logits: 1 };
            logits = Some(model.run(slot..slot + 1, &[row]).unwrap());
        }
        let logits = logits.unwrap();
        let want = common::full_recompute_logits(&mut session, &p.iter().map(|&t| i64::from(t)).collect::<Vec<_>>());
        worst = worst.max(assert_close(logits.row(0), &want, kv, &format!("prefill of {} tokens", p.len())));
        last.push(argmax(logits.row(0)));
    }
    for step in 0..6 {
        // One run over slots 0..6; the holes carry a dummy token.
        let mut tokens = [[0u32]; 6];
        let mut past = [0usize; 6];
        let mut wanted = [false; 6];
        for (i, &slot) in slots.iter().enumerate() {
            tokens[slot] = [last[i]];
            past[slot] = seqs[i].len();
            wanted[slot] = true;
        }
        let rows: Vec<RowInput<'_>> =
            (0..6).map(|s| RowInput { tokens: &tokens[s], past: past[s], logits: usize::from(wanted[s]) }).collect();
        let logits = model.run(0..6, &rows).unwrap();
        for (i, _) in slots.iter().enumerate() {
            seqs[i].push(last[i]);
            let want =
                common::full_recompute_logits(&mut session, &seqs[i].iter().map(|&t| i64::from(t)).collect::<Vec<_>>());
            worst = worst.max(assert_close(logits.row(i), &want, kv, &format!("decode step {step}, row {i}")));
            last[i] = argmax(logits.row(i));
        }
    }
    // A copied slot continues exactly like its source.
    let len = seqs[1].len();
    model.cache.copy_slot(2, 3, len);
    let rows =
        [RowInput { tokens: &[last[1]], past: len, logits: 1 }, RowInput { tokens: &[last[1]], past: len, logits: 1 }];
    let logits = model.run(2..4, &rows).unwrap();
    assert_eq!(logits.row(0), logits.row(1));
    assert_eq!(shape.layers, 2);
    worst
}

/// Fresh prompts of different lengths in adjacent slots, prefilled in one
/// run (right-padded), then decoded together: each row as if alone.
#[test]
fn prompts_prefilled_together_equal_the_exported_graph() {
    for kv in LAYOUTS {
        prompts_together(kv);
    }
}

fn prompts_together(kv: KvLayout) {
    let (mut model, _) = built(4, kv);
    let mut session = common::fixture_session();
    let prompts: Vec<Vec<u32>> =
        vec![(0..9).map(|i| 300 + i * 5).collect(), vec![464, 2068], (0..23).map(|i| 1000 + i).collect()];
    let rows: Vec<RowInput<'_>> = prompts.iter().map(|p| RowInput { tokens: p, past: 0, logits: 1 }).collect();
    let logits = model.run(1..4, &rows).unwrap();
    let mut next = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let want = common::full_recompute_logits(&mut session, &p.iter().map(|&t| i64::from(t)).collect::<Vec<_>>());
        assert_close(logits.row(i), &want, kv, &format!("prompt {i} prefilled together"));
        next.push(argmax(logits.row(i)));
    }
    // The padding written after the shorter prompts is overwritten by their
    // next tokens and never attended to.
    let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
    let rows: Vec<RowInput<'_>> =
        prompts.iter().zip(&tokens).map(|(p, t)| RowInput { tokens: t, past: p.len(), logits: 1 }).collect();
    let logits = model.run(1..4, &rows).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let seq: Vec<i64> = p.iter().chain([&next[i]]).map(|&t| i64::from(t)).collect();
        let want = common::full_recompute_logits(&mut session, &seq);
        assert_close(logits.row(i), &want, kv, &format!("row {i} decode"));
    }
}

/// batchgen's kernel (unlike GroupQueryAttention) runs chunks of several
/// rows on their cached pasts in one run, with the logits of every position.
#[test]
fn slot_kernel_runs_chunks_of_several_rows_together() {
    let kv = KvLayout { dtype: KvDtype::Fp32, kernel: Kernel::Slot };
    let (mut model, _) = built(3, kv);
    let mut session = common::fixture_session();
    let a: Vec<u32> = (0..17).map(|i| 500 + i * 3).collect();
    let b: Vec<u32> = (0..6).map(|i| 9000 + i * 11).collect();
    // Pasts of 12 and 4 tokens, in slots 0 and 2 (slot 1 empty between).
    model.run(0..1, &[RowInput { tokens: &a[..12], past: 0, logits: 1 }]).unwrap();
    model.run(2..3, &[RowInput { tokens: &b[..4], past: 0, logits: 1 }]).unwrap();
    let rows = [
        RowInput { tokens: &a[12..], past: 12, logits: 5 },
        RowInput { tokens: &[1], past: 0, logits: 0 },
        RowInput { tokens: &b[4..], past: 4, logits: 2 },
    ];
    let logits = model.run(0..3, &rows).unwrap();
    assert_eq!(logits.data.len(), 7 * logits.vocab);
    let mut row = 0;
    for (seq, past) in [(&a, 12), (&b, 4)] {
        for end in past + 1..=seq.len() {
            let ids: Vec<i64> = seq[..end].iter().map(|&t| i64::from(t)).collect();
            let want = common::full_recompute_logits(&mut session, &ids);
            assert_close(logits.row(row), &want, kv, &format!("position {end} of a {}-token row", seq.len()));
            row += 1;
        }
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
}

/// The same weights read from a transformers checkpoint folder give the same
/// logits as from the export.
#[test]
fn safetensors_and_onnx_initializers_are_the_same_weights() {
    let dir = common::fixture_dir();
    let shape = Gpt2Shape::load(&dir.join("config.json")).unwrap();
    let from_onnx = Weights::from_onnx(&dir.join("model.onnx"), &shape).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    // Write a checkpoint as transformers names it (no `transformer.` prefix,
    // as on the hub), some tensors in float16 to exercise the conversion.
    let mut tensors = Vec::new();
    for (name, dims) in shape.tensors() {
        let s = &from_onnx.index[&name];
        let bytes = from_onnx.data[s.offset..s.offset + s.bytes()].to_vec();
        tensors.push((name, dims, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, d.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let from_st = Weights::from_safetensors(&path, &shape).unwrap();
    assert_eq!(from_st.index, from_onnx.index);
    assert_eq!(&*from_st.data, &*from_onnx.data);
}

/// An export whose identical initializers were deduplicated (torch's exporter
/// leaves the dropped names as Identity nodes over the one it keeps, as the
/// random 124M fixture has for its ones and zeros) reads as the same weights.
#[test]
fn deduplicated_initializers_are_read_through_identity_nodes() {
    use batchgen::graph::onnx;
    use prost::Message;
    let dir = common::fixture_dir();
    let shape = Gpt2Shape::load(&dir.join("config.json")).unwrap();
    let original = Weights::from_onnx(&dir.join("model.onnx"), &shape).unwrap();
    let mut model = onnx::ModelProto::decode(std::fs::read(dir.join("model.onnx")).unwrap().as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    // One name one hop from its initializer, one two hops (Identity of an Identity).
    let identity = |from: &str, to: &str| onnx::NodeProto {
        op_type: Some("Identity".into()),
        name: Some(format!("dedup_test_{to}")),
        input: vec![from.into()],
        output: vec![to.into()],
        ..Default::default()
    };
    for (name, kept, via) in [
        ("transformer.h.1.ln_1.weight", "kept_0", None),
        ("transformer.h.0.attn.c_attn.bias", "kept_1", Some("between_1")),
    ] {
        let t = graph.initializer.iter_mut().find(|t| t.name.as_deref() == Some(name)).unwrap();
        t.name = Some(kept.into());
        match via {
            None => graph.node.insert(0, identity(kept, name)),
            Some(via) => {
                graph.node.insert(0, identity(via, name));
                graph.node.insert(0, identity(kept, via));
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    let read = Weights::from_onnx(&path, &shape).unwrap();
    assert_eq!(read.index, original.index);
    assert_eq!(&*read.data, &*original.data);
    // Without the Identity nodes the names are missing, and the error names one.
    let graph = model.graph.as_mut().unwrap();
    graph.node.retain(|n| !n.name.as_deref().is_some_and(|n| n.starts_with("dedup_test_")));
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    let err = Weights::from_onnx(&path, &shape).unwrap_err().to_string();
    assert!(err.contains("h.1.ln_1.weight") || err.contains("h.0.attn.c_attn.bias"), "{err}");
}

/// The paged cache (`PagedAttention` over a block pool): rows whose block
/// tables are scattered over the pool, in reverse order, prefilled in chunks
/// side by side on their cached pasts and decoded together, and a row whose
/// table begins with another row's blocks (a shared prefix, never copied),
/// each equal to the export's full recompute, at float32 and float16.
#[test]
fn paged_rows_read_scattered_and_shared_blocks() {
    for dtype in [KvDtype::Fp32, KvDtype::Fp16] {
        let kv = KvLayout::paged(dtype);
        let mut model = paged(kv, 40, 4);
        let mut session = common::fixture_session();
        let a: Vec<u32> = (0..22).map(|i| (i * 733 + 11) % 50257).collect();
        // b shares a's first 12 tokens (three blocks), then goes its own way.
        let b: Vec<u32> = a[..12].iter().copied().chain((0..7).map(|i| 9000 + i * 11)).collect();
        // a's blocks, high ids first; b's own blocks after its shared three.
        let ta: Vec<u32> = (0..8).map(|j| 39 - 2 * j).collect();
        let tb: Vec<u32> = ta[..3].iter().copied().chain([4, 0, 8, 2, 6]).collect();
        let full = |session: &mut _, seq: &[u32]| {
            common::full_recompute_logits(session, &seq.iter().map(|&t| i64::from(t)).collect::<Vec<_>>())
        };
        // a's first 12 alone, then a's next 6 beside b's own 7 on b's shared past of 12.
        model.run(&[RowInput { tokens: &a[..12], past: 0, logits: 1 }], &[&ta]).unwrap();
        let rows =
            [RowInput { tokens: &a[12..18], past: 12, logits: 6 }, RowInput { tokens: &b[12..], past: 12, logits: 1 }];
        let logits = model.run(&rows, &[&ta, &tb]).unwrap();
        for end in 13..=18 {
            assert_close(logits.row(end - 13), &full(&mut session, &a[..end]), kv, &format!("a at {end}"));
        }
        assert_close(logits.row(6), &full(&mut session, &b), kv, "b on a's shared blocks");
        // Decode both together: b first, then a (any order, any lengths).
        let (mut sa, mut sb) = (a[..18].to_vec(), b.clone());
        for step in 0..5 {
            let (na, nb) = ([a[18 + step % 4]], [b[step]]);
            let rows = [
                RowInput { tokens: &nb, past: sb.len(), logits: 1 },
                RowInput { tokens: &na, past: sa.len(), logits: 1 },
            ];
            let logits = model.run(&rows, &[&tb, &ta]).unwrap();
            sb.push(nb[0]);
            sa.push(na[0]);
            assert_close(logits.row(0), &full(&mut session, &sb), kv, &format!("b decode {step}"));
            assert_close(logits.row(1), &full(&mut session, &sa), kv, &format!("a decode {step}"));
        }
        // A table too short for the run is refused, not read out of bounds.
        let short = [RowInput { tokens: &a[..9], past: 0, logits: 1 }];
        assert!(model.run(&short, &[&ta[..2]]).is_err());
    }
}

/// The paged backend holds a prefix several rows share once: a hit takes
/// the cached blocks (no copy), the KV gauge counts them once, admission
/// gives back what is shared, a fork of whole blocks copies nothing, and
/// every block goes back when the rows and the cache let go. The row served
/// from the cache gets the logits of the same prompt computed alone.
#[test]
fn paged_rows_share_a_cached_prefix_and_admission_counts_it_once() {
    use batchgen::engine::admission::{Candidate, Limits};
    use batchgen::engine::backend::{Backend, Chunk};
    use batchgen::engine::pages::PagedBackend;
    use batchgen::engine::prefix::PrefixCache;
    let kv = KvLayout::paged(KvDtype::Fp32);
    let model = paged(kv, 64, 4);
    let block_bytes = model.pool.shape.block_bytes();
    let mut backend = PagedBackend::new(model, 4, Some(PrefixCache::new(4, block_bytes, 1 << 20)));
    let mut alone = PagedBackend::new(paged(kv, 64, 4), 4, None);
    let a: Vec<u32> = (0..40).map(|i| (i * 733 + 11) % 50257).collect();
    let b: Vec<u32> = a[..36].iter().copied().chain((0..8).map(|i| 9000 + i)).collect();
    let s = backend.alloc(2).unwrap();
    backend.prefill(&[Chunk { slot: s[0], tokens: &a }]).unwrap();
    backend.remember(s[0], &a, false);
    assert_eq!(backend.held_tokens(), 40);
    // b's first 36 tokens are nine of a's blocks: taken, not copied.
    assert_eq!(backend.reuse(s[1], &b, 0), 36);
    assert_eq!(backend.take_copies().hit_bytes, 0);
    assert_eq!(backend.held_tokens(), 40, "the shared blocks count once");
    let got = backend.prefill(&[Chunk { slot: s[1], tokens: &b[36..] }]).unwrap();
    let t = alone.alloc(1).unwrap();
    let want = alone.prefill(&[Chunk { slot: t[0], tokens: &b }]).unwrap();
    assert_close(got.row(0), want.row(0), kv, "a prompt on shared blocks against the same prompt alone");
    assert_eq!(backend.held_tokens(), 48, "b's own two blocks");
    // Alone, a (40 + 10) and b (44 + 10) would take 104 of 120 positions
    // and leave no room for 20 + 10 more; they share 36, so it fits.
    let limits = Limits {
        max_batch_size: 4,
        max_batch_tokens: 120,
        max_prefill_tokens: 64,
        max_burst_prefill_tokens: 64,
        idle_gather_gap: std::time::Duration::ZERO,
        idle_gather_max: std::time::Duration::ZERO,
    };
    let running = [
        Candidate { prompt_len: 40, max_new_tokens: 10, rows: 1 },
        Candidate { prompt_len: 44, max_new_tokens: 10, rows: 1 },
    ];
    let waiting = Candidate { prompt_len: 20, max_new_tokens: 10, rows: 1 };
    assert_eq!(backend.admit(&limits, &running, &mut std::iter::once(waiting)), 1);
    assert_eq!(alone.admit(&limits, &running, &mut std::iter::once(waiting)), 0, "without sharing it does not fit");
    // A fork of b's 44 tokens (whole blocks) shares them all.
    let c = backend.alloc(1).unwrap();
    assert_eq!(backend.fork(s[1], &c).unwrap(), 0);
    assert_eq!(backend.held_tokens(), 48);
    // Rows gone: the gauge is back to zero (the cache keeps its blocks).
    backend.free(&[s[0], s[1], c[0]]);
    assert_eq!(backend.held_tokens(), 0);
}

/// Our kernels' graphs choose each logits row's greedy token inside the run
/// (`batchgen.Greedy`): the id and the log-probability equal what
/// `sampling::greedy` makes of the same logits, bit for bit, for every row of
/// a run (prompts, several logits of one row, decode steps); the graph with
/// ONNX Runtime's GroupQueryAttention has no such outputs.
#[test]
fn the_runs_greedy_choices_equal_choosing_on_its_logits() {
    use batchgen::decoding::sampling;
    let check = |logits: &batchgen::engine::Logits, what: &str| {
        let rows = logits.data.len() / logits.vocab;
        assert_eq!(logits.greedy.len(), rows, "{what}: one greedy choice per logits row");
        for r in 0..rows {
            let (row, given) = (logits.row(r), logits.greedy(r).unwrap());
            let want = sampling::greedy(row, &[], 3);
            assert_eq!(given.id, want.id, "{what}: row {r}");
            assert_eq!(
                ((row[given.id as usize] as f64 - given.lse) as f32).to_bits(),
                want.logprob.to_bits(),
                "{what}"
            );
            assert_eq!(sampling::top_logprobs(row, given.lse, 3), want.top, "{what}: row {r}");
        }
    };
    let a: Vec<u32> = (0..20).map(|i| (i * 733 + 11) % 50257).collect();
    let b: Vec<u32> = (0..9).map(|i| 9000 + i * 11).collect();
    for dtype in [KvDtype::Fp32, KvDtype::Fp16] {
        let mut model = paged(KvLayout::paged(dtype), 24, 4);
        let (ta, tb): (Vec<u32>, Vec<u32>) = ((0..6).collect(), (6..12).collect());
        let rows = [RowInput { tokens: &a[..16], past: 0, logits: 5 }, RowInput { tokens: &b, past: 0, logits: 1 }];
        check(&model.run(&rows, &[&ta, &tb]).unwrap(), &format!("paged {dtype} prompts"));
        let rows =
            [RowInput { tokens: &a[16..17], past: 16, logits: 1 }, RowInput { tokens: &a[..1], past: 9, logits: 1 }];
        check(&model.run(&rows, &[&ta, &tb]).unwrap(), &format!("paged {dtype} decode"));
    }
    for kv in LAYOUTS {
        let (mut model, _) = built(2, kv);
        let logits = model.run(0..1, &[RowInput { tokens: &a, past: 0, logits: 4 }]).unwrap();
        if kv.kernel == Kernel::GroupQuery {
            assert!(logits.greedy.is_empty(), "GroupQueryAttention's graph has no greedy outputs");
        } else {
            check(&logits, &format!("slot kernel {}", kv.dtype));
        }
    }
}
