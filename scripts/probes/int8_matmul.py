# Run: python3 scripts/probes/int8_matmul.py (numpy, onnx, onnxruntime 1.32). Results: docs/performance.md, "Weight precision".
# Cost of GPT-2 124M's matmuls in fp32, DynamicQuantizeMatMul (int8 per channel) and MatMulNBits (8 bits, blocks)
import numpy as np, onnxruntime as ort, time, sys
from onnx import helper, TensorProto as T, numpy_helper as nh
E=768
shapes=[(E,3*E),(E,E),(E,4*E),(4*E,E)]*12
lm=(E,50257)
rng=np.random.default_rng(0)
def model(kind, with_lm, block=32, acc=4):
    nodes=[]; inits=[]; x="x"
    allsh = shapes + ([lm] if with_lm else [])
    outs=[]
    for i,(k,n) in enumerate(allsh):
        w=(rng.standard_normal((k,n))*0.02).astype(np.float32)
        o=f"y{i}"
        if kind=="fp32":
            inits.append(nh.from_array(w,f"w{i}")); nodes.append(helper.make_node("MatMul",["x",f"w{i}"],[o]))
        elif kind=="dq":
            s=np.abs(w).max(0)/127; q=np.round(w/s).astype(np.int8)
            inits+= [nh.from_array(q,f"w{i}"), nh.from_array(s.astype(np.float32),f"s{i}"), nh.from_array(np.zeros(n,np.int8),f"z{i}")]
            nodes.append(helper.make_node("DynamicQuantizeMatMul",["x",f"w{i}",f"s{i}",f"z{i}"],[o],domain="com.microsoft"))
        else:
            nb=(k+block-1)//block
            wt=w.T.reshape(n,nb,block)
            s=np.abs(wt).max(2)/127; s[s==0]=1
            q=(np.clip(np.round(wt/s[...,None]),-128,127)+128).astype(np.uint8)
            inits+=[nh.from_array(q,f"w{i}"), nh.from_array(s.astype(np.float32).reshape(-1),f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits",["x",f"w{i}",f"s{i}"],[o],domain="com.microsoft",K=k,N=n,bits=8,block_size=block,accuracy_level=acc))
        outs.append(o)
    # only feed x of width E; for 4E inputs use separate input
    for nd in nodes:
        pass
    return nodes,inits,allsh
def sess(kind, with_lm, **kw):
    nodes,inits,allsh=model(kind,with_lm,**kw)
    ins=[helper.make_tensor_value_info("x",T.FLOAT,["B",E]), helper.make_tensor_value_info("x4",T.FLOAT,["B",4*E])]
    for nd,(k,n) in zip(nodes,allsh):
        if k==4*E: nd.input[0]="x4"
    outs=[helper.make_tensor_value_info(nd.output[0],T.FLOAT,None) for nd in nodes]
    m=helper.make_model(helper.make_graph(nodes,"g",ins,outs,inits),opset_imports=[helper.make_opsetid("",17),helper.make_opsetid("com.microsoft",1)]); m.ir_version=8
    so=ort.SessionOptions(); so.intra_op_num_threads=2
    return ort.InferenceSession(m.SerializeToString(),so,providers=["CPUExecutionProvider"]), [nd.output[0] for nd in nodes]
def bench(s,outs,B,reps):
    x=rng.standard_normal((B,E)).astype(np.float32); x4=rng.standard_normal((B,4*E)).astype(np.float32)
    for _ in range(2): s.run(outs,{"x":x,"x4":x4})
    t=time.perf_counter()
    for _ in range(reps): s.run(outs,{"x":x,"x4":x4})
    return (time.perf_counter()-t)/reps*1e3
cfgs=[("fp32",{}),("dq",{}),("nbits",dict(block=32,acc=4)),("nbits",dict(block=128,acc=4)),("nbits",dict(block=32,acc=0))]
for with_lm in (False,True):
  for kind,kw in cfgs:
    s,outs=sess(kind,with_lm,**kw)
    r=[bench(s,outs,B,reps) for B,reps in ((1,20),(16,10),(256,3))]
    print(f"{kind:6} {str(kw):28} lm={with_lm}: B1 {r[0]:7.2f} ms  B16 {r[1]:7.2f} ms  B256 {r[2]:8.2f} ms", flush=True)
