# Run: python3 scripts/probes/gemm_step.py [THREADS] (numpy, onnx, onnxruntime 1.32). The same step through our own kernel: scripts/probes/gemm_step.rs.
# A decode step's GEMMs alone with cold (streamed) weights: 12 GPT-2 small layers + the LM head.
import numpy as np, onnxruntime as ort, onnx, time, sys
from onnx import helper, TensorProto, numpy_helper
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
E, I, V, L = 768, 3072, 50257, 12
rng = np.random.default_rng(0)
nodes, inits = [], []
cur = "x"
for l in range(L):
    for name, k, n in [("qkv", E, 3 * E), ("proj", E, E), ("fc", E, I), ("fcp", I, E)]:
        w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02)
        inits.append(numpy_helper.from_array(w, f"w{l}{name}"))
        out = f"{name}{l}"
        nodes.append(helper.make_node("MatMul", [cur, f"w{l}{name}"], [out]))
        cur = out
        if name == "qkv":
            inits.append(numpy_helper.from_array(np.array([0], np.int64), f"s0{l}"))
            inits.append(numpy_helper.from_array(np.array([E], np.int64), f"s1{l}"))
            inits.append(numpy_helper.from_array(np.array([1], np.int64), f"ax{l}"))
            nodes.append(helper.make_node("Slice", [cur, f"s0{l}", f"s1{l}", f"ax{l}"], [f"q{l}"]))
            cur = f"q{l}"
wte = rng.standard_normal((V, E), dtype=np.float32) * 0.02
inits.append(numpy_helper.from_array(wte, "wte"))
nodes.append(helper.make_node("Gemm", [cur, "wte"], ["logits"], transB=1))
g = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", E])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["m", V])], inits)
model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); model.ir_version = 8
so = ort.SessionOptions(); so.intra_op_num_threads = threads
s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
for m in [1, 16, 32]:
    x = rng.standard_normal((m, E), dtype=np.float32)
    s.run(None, {"x": x})
    it = 20
    ts = []
    for _ in range(it):
        t = time.perf_counter(); s.run(None, {"x": x}); ts.append(time.perf_counter() - t)
    dt = sorted(ts)[it // 2]
    P = L * (E * 3 * E + E * E + 2 * E * I) + E * V
    print(f"ORT step m {m}: {dt*1e3:.2f} ms median, {2*m*P/dt/1e9:.1f} GFLOP/s, {4*P/dt/1e9:.1f} GB/s weights")
