"""Speed for CPUs, installed into a model explicitly; the model never imports this package.

``features`` (what this CPU has, one table of families), ``plan`` (what ``auto`` picks per
family), ``kernels`` (the C++ source, its loader, the Python signatures of its functions),
``quantize`` (int8 and w8a8 projections), ``kvcache`` (the int8 KV ring), ``fused`` (the LM's
decode step in one call per layer), ``codebook`` (Mimi's compiled codebook search) and
``install`` (``install(lm, mimi, plan)``). Adding a CPU family touches this package only.
"""
