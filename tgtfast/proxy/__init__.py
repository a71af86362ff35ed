"""The Proxy Teacher (PTLoss paper Sec. 4.1.2-4.1.3; docs/design.md, "Proxy Teacher") and the coefficient search.

A student trained with PTLoss against a teacher ``p`` (rich student class) converges to

    p_PT = argmin_{q in simplex} L(p, q),
    L(p, q) = sum_j p_j (log p_j - log q_j) + sum_j p_j sum_m eta[m, j] (1 - q_j)^m,

the *proxy teacher*: the distribution that plain KL distillation would have to be given to train the same
student. :func:`proxy_teacher` solves for it, batched over rows and candidate coefficient sets;
:func:`deviation` is the paper's Eq. 21 (as written) on a labelled validation set; :func:`search_coefficients`
draws random coefficient sets (plus ``coeffs = 0``, i.e. plain KL), keeps the one with the smallest deviation,
and optionally refines it by gradient descent through the solve.

Where things live:

* :mod:`tgtfast.proxy.solve`: the float64 reference solvers (multi-class damped Newton, global binary search),
  the batched solve and its implicit differentiation; :func:`proxy_teacher`, :func:`stationarity_residual`.
* :mod:`tgtfast.proxy.search`: Eq. 21, :class:`CoefficientSearchResult`, :func:`search_coefficients`, the refine
  step and the ``torch.distributed`` all-reduce.
* :mod:`tgtfast.ops.proxy_solve`: the op's registration (``torch.ops.tgtfast.proxy_solve``,
  ``proxy_deviation_sums``, the dispatcher entry ``"proxy_teacher"``) and the backend choice (``backend=``:
  ``"cpp"``, ``"cuda"`` or ``"reference"``; no Triton kernel).
* :mod:`tgtfast.cli.coeffs`: the ``tgtfast coeffs`` command (:func:`coeffs_main`).
"""

from __future__ import annotations

from tgtfast.proxy.search import CoefficientSearchResult, deviation, search_coefficients
from tgtfast.proxy.solve import proxy_teacher, stationarity_residual
from tgtfast.cli.coeffs import main as coeffs_main  # noqa: E402  (after the package's own modules)

__all__ = [
    "proxy_teacher",
    "deviation",
    "stationarity_residual",
    "search_coefficients",
    "CoefficientSearchResult",
    "coeffs_main",
]
