"""One module per op stem: everything about registering that op (fake kernel, autograd, the table of backend
implementations, the Triton loader and its entry in :mod:`tgtfast.dispatch`).

======================  =====================================  ==========================================
stem                    dispatcher op name(s)                  compiled schemas (csrc/ops.cpp)
======================  =====================================  ==========================================
``ptloss``              ``ptloss``                             ``ptloss_fwd``
``divergence``          ``divergence``                         ``divergence_fwd``
``sparse``              ``sparse_coarse``                      ``sparse_coarse_fwd``, ``sparse_coarse_bwd``
``noise``               ``perturb``, ``latent_noise``          ``perturb``, ``latent_noise_``
``softmax``             ``temperature_softmax``                ``temperature_softmax``
``mlp_chain``           ``perturb_decode_label_mlp``           ``mlp_chain_fwd``, ``mlp_chain_bwd``
``proxy_solve``         ``proxy_teacher``                      ``proxy_solve``, ``proxy_deviation_sums``
======================  =====================================  ==========================================

The same stem names the Triton kernels (``kernels/<stem>.py``), the C++ sources (``csrc/<stem>/``), the CUDA
sources (``csrc/cuda/<stem>_cuda*``), the tests (``tests/test_<stem>.py``) and the benchmarks
(``benchmarks/bench_<stem>.py``).
"""

from tgtfast.ops import divergence, mlp_chain, noise, proxy_solve, ptloss, softmax, sparse  # noqa: F401  (registers every op)

STEMS = ("ptloss", "divergence", "sparse", "noise", "softmax", "mlp_chain", "proxy_solve")
