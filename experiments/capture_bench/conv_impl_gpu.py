"""Prototype behind Conv(impl="patches"): per-example DP-SGD capture step of lenet-dlg with
XLA convolutions vs im2col patches, on whatever JAX backend is present. Standalone (no jaxleak import).

Run: python experiments/capture_bench/conv_impl_gpu.py   (results: BENCHMARKS.md, H100 section)
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


def bench(f, *a, r=10):
    jax.block_until_ready(f(*a)); ts=[]
    for _ in range(r):
        t=time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter()-t)
    return float(np.median(ts))
class SliceConv(nn.Module):
    features: int; k: int; stride: int
    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kern = self.param("kernel", nn.initializers.lecun_normal(), (self.k,self.k,cin,self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        p = self.k//2; s=self.stride
        xp = jnp.pad(x, ((0,0),(p,p),(p,p),(0,0)))
        H = (x.shape[1]+2*p-self.k)//s+1; W=(x.shape[2]+2*p-self.k)//s+1
        cols = [xp[:, i:i+s*(H-1)+1:s, j:j+s*(W-1)+1:s, :] for i in range(self.k) for j in range(self.k)]
        patches = jnp.concatenate(cols, axis=-1)
        return jnp.einsum("bhwd,dc->bhwc", patches, kern.reshape(-1, self.features), precision="highest") + bias
class Net(nn.Module):
    patch: bool
    @nn.compact
    def __call__(self, x):
        for i,s in enumerate((2,2,1)):
            if self.patch: x = SliceConv(12,5,s,name=f"conv{i}")(x)
            else: x = nn.Conv(12,(5,5),strides=s,padding=((2,2),(2,2)),name=f"conv{i}")(x)
            x = nn.sigmoid(x)
        return nn.Dense(10,name="head")(x.reshape(x.shape[0],-1))
def step(m):
    def loss(p, xi, yi): return optax.softmax_cross_entropy_with_integer_labels(m.apply(p, xi[None])[0], yi)
    def f(p, x, y, key):
        g = jax.vmap(jax.grad(loss), in_axes=(None,0,0))(p, x, y)
        sq = sum(jnp.sum(t.reshape(t.shape[0], -1)**2, 1) for t in jax.tree_util.tree_leaves(g))
        fac = jnp.minimum(1.0, 1.0/jnp.sqrt(sq))
        h = g["params"]["head"]
        return h["kernel"]*fac[:,None,None] + jax.random.normal(key, h["kernel"].shape), h["bias"]*fac[:,None]
    return jax.jit(f)
for B in (1024, 8192, 65536):
    x = jnp.asarray(np.random.default_rng(0).random((B,32,32,3),np.float32)); y=jnp.asarray(np.arange(B)%10)
    a, b = Net(False), Net(True); params = a.init(jax.random.PRNGKey(0), x[:1])
    for name, m in (("xla-conv", a), ("slice-conv", b)):
        t = bench(step(m), params, x, y, jax.random.PRNGKey(1))
        print(f"B={B} {name}: {t*1e3:.2f} ms  {B/t:.0f} ex/s", flush=True)
    for prec in ("default", "highest"):
        with jax.default_matmul_precision(prec):
            t = bench(step(a), params, x, y, jax.random.PRNGKey(1))
        print(f"B={B} xla-conv precision={prec}: {t*1e3:.2f} ms {B/t:.0f} ex/s", flush=True)
