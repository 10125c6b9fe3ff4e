#!/usr/bin/env python3
"""ms per call of one MoE block (hidden 1024, intermediate 512, 64 experts, top-8, 2 threads) at 1 / 8 / 64 tokens,
float `com.microsoft.MoE` against `QMoE` forms, and the process RSS after loading (random weights; the timing does
not depend on their values). CFG: `moe`, `q8` (8-bit per column), `q8b32` (blocks of 32), `q4b32a0` (4-bit blocks
of 32, accuracy_level 0), `q4b32a4`, `q4b128a0`, `q4b128a4`. Table in export/src/onnx/sparse_moe/quantized.rs.

  for c in moe q8 q8b32 q4b32a0 q4b32a4; do .r1/genai-venv/bin/python export/benches/qmoe_speed.py $c; done
"""
import numpy as np, onnx, onnxruntime as ort, time, sys, resource, os
from onnx import helper, TensorProto, numpy_helper
E,H,I,K=64,1024,512,8
cfg=sys.argv[1]
rng=np.random.default_rng(0)
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])/1024
vi=lambda n,s: helper.make_tensor_value_info(n,TensorProto.FLOAT,s)
if cfg=='moe':
    inits=[numpy_helper.from_array(rng.standard_normal((E,2*I,H),dtype=np.float32)*0.02,'fc1'),numpy_helper.from_array(rng.standard_normal((E,H,I),dtype=np.float32)*0.02,'fc2')]
    node=helper.make_node('MoE',['x','probs','fc1','','fc2'],['y'],domain='com.microsoft',k=K,activation_type='swiglu',swiglu_fusion=1,activation_alpha=1.0,activation_beta=0.0,normalize_routing_weights=1)
else:
    bits=int(cfg[1]); block=int(cfg.split('b')[1].split('a')[0]) if 'b' in cfg else 0; acc=int(cfg.split('a')[1]) if 'a' in cfg else 0
    pk=8//bits
    def q(n,k):
        nb = k//block if block else 1
        w=rng.integers(0,256,(E,n,k//pk),dtype=np.uint8)
        s=(rng.random((E,n,nb) if block else (E,n),dtype=np.float32)*0.001+0.001)
        return w,s
    w1,s1=q(2*I,H); w2,s2=q(H,I)
    inits=[numpy_helper.from_array(w1,'fc1'),numpy_helper.from_array(s1,'s1'),numpy_helper.from_array(w2,'fc2'),numpy_helper.from_array(s2,'s2')]
    attrs=dict(k=K,activation_type='swiglu',swiglu_fusion=1,activation_alpha=1.0,activation_beta=0.0,expert_weight_bits=bits,accuracy_level=acc,normalize_routing_weights=0)
    if block: attrs['block_size']=block
    node=helper.make_node('QMoE',['x','probs','fc1','s1','','fc2','s2','','','','','','','','probs'],['y'],domain='com.microsoft',**attrs)
g=helper.make_graph([node],'g',[vi('x',['n',H]),vi('probs',['n',E])],[vi('y',['n',H])],inits)
m=helper.make_model(g,opset_imports=[helper.make_opsetid('',21),helper.make_opsetid('com.microsoft',1)],ir_version=10)
b=m.SerializeToString(); del m, g, inits
r0=rss()
so=ort.SessionOptions(); so.intra_op_num_threads=2
s=ort.InferenceSession(b,so,providers=['CPUExecutionProvider'])
del b
out=[]
for n in [1,8,64]:
    x=rng.standard_normal((n,H),dtype=np.float32); p=rng.random((n,E),dtype=np.float32)
    for _ in range(3): s.run(None,{'x':x,'probs':p})
    t=time.perf_counter(); it=20 if n<64 else 5
    for _ in range(it): s.run(None,{'x':x,'probs':p})
    out.append('%.2f'%((time.perf_counter()-t)/it*1e3))
print(cfg,'ms@1/8/64:',' / '.join(out),' RSS after load+run MB: %.0f (start %.0f)'%(rss(),r0))
