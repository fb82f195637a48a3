# GroupQueryAttention with a float16 KV cache on the CPU provider against float32: per-layer cost of decode and prefill, and the
# largest difference of its output. Run: python3 scripts/probes/gqa_fp16.py (numpy, onnx, onnxruntime 1.32).
import numpy as np, onnxruntime as ort, time
from onnx import helper, TensorProto as T
H, D = 12, 64; HD = H * D
def sess_for(dt):
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total"], ["out", "ok", "ov"],
                            domain="com.microsoft", num_heads=H, kv_num_heads=H)
    ins = [helper.make_tensor_value_info(n, dt, ["B", "S", HD]) for n in "qkv"] + \
          [helper.make_tensor_value_info(n, dt, ["B", H, "M", D]) for n in ("pk", "pv")] + \
          [helper.make_tensor_value_info("seqlens_k", T.INT32, ["B"]), helper.make_tensor_value_info("total", T.INT32, [1])]
    outs = [helper.make_tensor_value_info("out", dt, ["B", "S", HD])] + [helper.make_tensor_value_info(n, dt, ["B", H, "M2", D]) for n in ("ok", "ov")]
    m = helper.make_model(helper.make_graph([node], "g", ins, outs), opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
def bench(s, npdt, B, MAX, L, S=1, reps=30):
    rng=np.random.default_rng(0)
    kb = rng.random((B, H, MAX, D)).astype(npdt); vb = rng.random((B, H, MAX, D)).astype(npdt)
    kv, vv = ort.OrtValue.ortvalue_from_numpy(kb), ort.OrtValue.ortvalue_from_numpy(vb)
    q = rng.random((B, S, HD)).astype(npdt)
    io = s.io_binding()
    for n in "qkv": io.bind_cpu_input(n, q)
    io.bind_ortvalue_input("pk", kv); io.bind_ortvalue_input("pv", vv)
    io.bind_cpu_input("seqlens_k", np.full(B, L + S - 1, np.int32)); io.bind_cpu_input("total", np.array([L + S], np.int32))
    io.bind_output("out", "cpu"); io.bind_ortvalue_output("ok", kv); io.bind_ortvalue_output("ov", vv)
    for _ in range(3): s.run_with_iobinding(io)
    out = io.copy_outputs_to_cpu()[0]
    t = time.perf_counter()
    for _ in range(reps): s.run_with_iobinding(io)
    return (time.perf_counter() - t) / reps * 1e3, out
s32 = sess_for(T.FLOAT)
try:
    s16 = sess_for(T.FLOAT16)
except Exception as e:
    print("fp16 GQA refused:", e); raise SystemExit
for B, MAX, L in [(1,1024,512),(16, 1024, 64), (16, 1024, 512), (16, 768, 700)]:
    t32, o32 = bench(s32, np.float32, B, MAX, L)
    t16, o16 = bench(s16, np.float16, B, MAX, L)
    print(f"decode B={B} MAX={MAX} len={L}: fp32 {t32:.3f} ms fp16 {t16:.3f} ms per layer; max|diff| {np.abs(o32-o16.astype(np.float32)).max():.2e}")
t32,_=bench(s32,np.float32,1,1024,0,S=512,reps=5); t16,_=bench(s16,np.float16,1,1024,0,S=512,reps=5)
print(f"prefill 512: fp32 {t32:.2f} fp16 {t16:.2f} ms per layer")
