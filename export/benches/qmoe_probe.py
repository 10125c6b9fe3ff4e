#!/usr/bin/env python3
"""What ONNX Runtime's CPU `com.microsoft.QMoE` computes, against a NumPy reference of the dequantized experts
(export/src/onnx/sparse_moe/quantized.rs relies on it): 8-bit per column or in blocks, 4-bit in blocks, with and
without zero points, 4-bit nibble order, `router_weights` with `normalize_routing_weights = 0` against the `ln`
routing of the float `MoE`, and `accuracy_level` 0 / 4. Prints, per configuration, the relative error against the
dequantized reference and against the float weights. Needs onnxruntime, onnx, numpy (.r1/genai-venv).

  .r1/genai-venv/bin/python export/benches/qmoe_probe.py
"""
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
rng=np.random.default_rng(0)
E,H,I,K,N=4,64,32,2,5
def silu(x): return x/(1+np.exp(-x))
W1=rng.standard_normal((E,2*I,H)).astype(np.float32)*0.1   # interleaved gate/up rows
W2=rng.standard_normal((E,H,I)).astype(np.float32)*0.1
x=rng.standard_normal((N,H)).astype(np.float32)
w=np.zeros((N,E),np.float32)
for n in range(N):
    sel=rng.choice(E,K,replace=False); w[n,sel]=rng.uniform(0.2,1.5,K)
def ref(W1,W2):
    out=np.zeros((N,H),np.float32)
    for n in range(N):
        for e in range(E):
            if w[n,e]==0: continue
            h=W1[e]@x[n]; g=h[0::2]; u=h[1::2]
            out[n]+=w[n,e]*(W2[e]@(silu(g)*u))
    return out
def quant(W,bits,block,asym):
    # W [E, Nout, Kin]; blocks along K
    E_,No,Ki=W.shape; b=block if block else Ki
    Wb=W.reshape(E_,No,Ki//b,b)
    qmax=2**bits-1
    if asym:
        lo=np.minimum(Wb.min(-1),0); hi=np.maximum(Wb.max(-1),0)
        s=(hi-lo)/qmax; s[s==0]=1; z=np.clip(np.round(-lo/s),0,qmax)
    else:
        s=np.abs(Wb).max(-1)/(2**(bits-1)-1); s[s==0]=1; z=np.full(s.shape,2**(bits-1))
    q=np.clip(np.round(Wb/s[...,None])+z[...,None],0,qmax)
    deq=((q-z[...,None])*s[...,None]).reshape(W.shape)
    return q.reshape(W.shape).astype(np.uint8),s.astype(np.float32),z.astype(np.uint8),deq.astype(np.float32)
def pack4(q):  # along last axis, low nibble = even index
    return (q[...,0::2] | (q[...,1::2]<<4)).astype(np.uint8)
def run(bits,block,asym,use_rw,acc=0,lo_first=True):
    q1,s1,z1,d1=quant(W1,bits,block,asym); q2,s2,z2,d2=quant(W2,bits,block,asym)
    pk=(lambda q: pack4(q) if lo_first else (q[...,1::2]|(q[...,0::2]<<4)).astype(np.uint8)) if bits==4 else (lambda q:q)
    inits=[numpy_helper.from_array(pk(q1),'fc1'),numpy_helper.from_array(pk(q2),'fc2')]
    if block:
        inits+= [numpy_helper.from_array(s1,'s1'),numpy_helper.from_array(s2,'s2')]
    else:
        inits+= [numpy_helper.from_array(s1[...,0],'s1'),numpy_helper.from_array(s2[...,0],'s2')]
    ins=['x','probs','fc1','s1','','fc2','s2','','','','']
    if asym:
        zz1 = z1 if block else z1[...,0]; zz2 = z2 if block else z2[...,0]
        if bits==4: zz1=pk(zz1) if zz1.shape[-1]%2==0 else pk(np.concatenate([zz1,np.zeros(zz1.shape[:-1]+(1,),np.uint8)],-1)); zz2=pk(zz2) if zz2.shape[-1]%2==0 else pk(np.concatenate([zz2,np.zeros(zz2.shape[:-1]+(1,),np.uint8)],-1))
        inits+=[numpy_helper.from_array(zz1,'z1'),numpy_helper.from_array(zz2,'z2')]
        ins+=['z1','z2','']
    else: ins+=['','','']
    attrs=dict(k=K,activation_type='swiglu',swiglu_fusion=1,activation_alpha=1.0,activation_beta=0.0,expert_weight_bits=bits,accuracy_level=acc)
    if block: attrs['block_size']=block
    if use_rw:
        ins+=['rw']; attrs['normalize_routing_weights']=0
        probs=w.copy()
    else:
        attrs['normalize_routing_weights']=1
        probs=np.log(np.maximum(w,1e-30))
    node=helper.make_node('QMoE',ins,['y'],domain='com.microsoft',**attrs)
    vi=lambda n,s: helper.make_tensor_value_info(n,TensorProto.FLOAT,s)
    gin=[vi('x',[N,H]),vi('probs',[N,E])]+([vi('rw',[N,E])] if use_rw else [])
    g=helper.make_graph([node],'g',gin,[vi('y',[N,H])],inits)
    m=helper.make_model(g,opset_imports=[helper.make_opsetid('',21),helper.make_opsetid('com.microsoft',1)],ir_version=10)
    s=ort.InferenceSession(m.SerializeToString(),providers=['CPUExecutionProvider'])
    feed={'x':x,'probs':probs}
    if use_rw: feed['rw']=w
    y=s.run(None,feed)[0]
    if not use_rw: y=y*w.sum(1,keepdims=True)
    r=ref(d1,d2); rf=ref(W1,W2)
    return np.abs(y-r).max()/np.abs(r).max(), np.abs(y-rf).max()/np.abs(rf).max()
for cfg in [(8,0,False,True),(8,0,False,False),(8,0,True,True),(8,32,False,True),(8,32,True,True),(4,32,True,True),(4,32,True,True,0,False),(4,32,False,True),(4,16,True,True),(4,0,True,True),(4,32,True,True,4)]:
    try: print(cfg, 'vs deq-ref %.2e  vs fp32 %.2e'%run(*cfg))
    except Exception as e: print(cfg,'ERR',str(e)[:300])
