// The Proxy Teacher solve for one (candidate, row) pair, float64, torch-free.
//
//   q* = argmin_{q in simplex} L(p, q),  L = sum_j p_j (log p_j - log q_j) + sum_j p_j sum_m eta[m, j] (1 - q_j)^m
//
// K >= 3: damped Newton on the logits from z = log p (the algorithm of tgtfast/proxy.py:_solve_mc_block, one row
// at a time): L is separable in q, so the equality-constrained Newton step costs O(K); where the reduced Hessian
// is not positive definite the KL curvature p/q replaces the bad entries; Armijo backtracking makes every accepted
// step decrease L. Classes with p_j = 0 keep q_j = 0 and are left out of the iteration.
// K = 2: the global minimiser of the 1-D problem in u = logit(q_0) (tgtfast/proxy.py:_solve_bin_block): a grid
// over the interval that holds every minimum, golden-section search from the three best local minima of the grid,
// then safeguarded Newton; the boundary q_0 = 0 / 1 when a class has no teacher mass.
// Host and device code: csrc/proxy_solve/proxy_solve_cpu.cpp runs it per (candidate, row) pair on CPU threads,
// csrc/cuda/proxy_solve_cuda.cu one pair per CUDA thread.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define TGTFAST_PHD __host__ __device__ inline
#else
#define TGTFAST_PHD inline
#endif

namespace tgtfast {
namespace proxy {

// P(x) = sum_{m=1..M} eta[m-1] x^m and its first two derivatives (Horner); eta strided by `stride`.
TGTFAST_PHD void poly(const double* eta, int m, int stride, double x, double& pv, double& d1, double& d2) {
  if (m == 0) {
    pv = d1 = d2 = 0.0;
    return;
  }
  double b = eta[(m - 1) * stride], a1 = 0.0, a2 = 0.0;
  for (int i = m - 1; i > 0; --i) {
    a2 = a2 * x + a1;
    a1 = a1 * x + b;
    b = b * x + eta[(i - 1) * stride];
  }
  a2 = a2 * x + a1;
  a1 = a1 * x + b;
  pv = b * x;
  d1 = a1;
  d2 = 2.0 * a2;
}

TGTFAST_PHD double poly_value(const double* eta, int m, int stride, double x) {
  double b = 0.0;
  for (int i = m; i > 0; --i) b = b * x + eta[(i - 1) * stride];
  return b * x;
}

// Scratch for one row of the multi-class solve (reused across rows by one thread): idx [k] and
// buf [k * (20 + m)] (19 + m arrays of the support size are taken).
struct Workspace {
  int* idx;
  double* buf;
};

TGTFAST_PHD long workspace_doubles(int k, int m) { return static_cast<long>(k) * (20 + m); }

struct McRow {
  int s, m;            // support size, orders
  const double* p;     // [s]
  const double* logp;  // [s]
  const double* eta;   // [m, s]
};

// State of the multi-class objective at logits z (support only).
struct McState {
  double* q;      // [s]
  double* logq;   // [s]
  double* phi;    // -dL/dq_j  (ratio + p P'(1 - q))
  double* e;      // q d2L/dq2 (ratio + p q P''(1 - q))
  double* ratio;  // p / q
  double obj;     // L without the constant sum p log p
  double lam;     // sum q phi
};

// Softmax of z with 1 - q_j computed without cancellation (sum of the other classes' weights).
TGTFAST_PHD void softmax_parts(const double* z, int s, double* w, double* q, double* logq, double* one_minus_q) {
  double mx = -INFINITY;
  for (int j = 0; j < s; ++j) mx = fmax(mx, z[j]);
  double total = 0.0;
  for (int j = 0; j < s; ++j) {
    w[j] = exp(z[j] - mx);
    total += w[j];
  }
  const double log_total = log(total), inv = 1.0 / total;
  double prefix = 0.0;
  for (int j = 0; j < s; ++j) {  // one_minus_q[j] <- prefix sum of the others, completed below
    one_minus_q[j] = prefix;
    prefix += w[j];
  }
  double suffix = 0.0;
  for (int j = s - 1; j >= 0; --j) {
    one_minus_q[j] = (one_minus_q[j] + suffix) * inv;
    suffix += w[j];
    q[j] = w[j] * inv;
    logq[j] = z[j] - mx - log_total;
  }
}

TGTFAST_PHD void mc_state(const McRow& r, const double* z, double* tmp_w, double* tmp_x, McState& st) {
  softmax_parts(z, r.s, tmp_w, st.q, st.logq, tmp_x);
  double obj = 0.0, lam = 0.0;
  for (int j = 0; j < r.s; ++j) {
    double pv, d1, d2;
    poly(r.eta + j, r.m, r.s, tmp_x[j], pv, d1, d2);
    const double ratio = st.q[j] > 1e-300 ? r.p[j] / st.q[j] : exp(r.logp[j] - st.logq[j]);
    st.ratio[j] = ratio;
    st.phi[j] = ratio + r.p[j] * d1;
    st.e[j] = ratio + r.p[j] * st.q[j] * d2;
    obj += r.p[j] * (pv - st.logq[j]);
    lam += st.q[j] * st.phi[j];
  }
  st.obj = obj;
  st.lam = lam;
}

// The state at the start z = log p, where q = p exactly (no exponentials needed).
TGTFAST_PHD void mc_state_at_teacher(const McRow& r, double* tmp_x, McState& st) {
  double prefix = 0.0;
  for (int j = 0; j < r.s; ++j) {
    tmp_x[j] = prefix;
    prefix += r.p[j];
  }
  double suffix = 0.0, obj = 0.0, lam = 0.0;
  for (int j = r.s - 1; j >= 0; --j) {
    const double x = (tmp_x[j] + suffix) / prefix;  // 1 - q_j as the sum of the others
    suffix += r.p[j];
    double pv, d1, d2;
    poly(r.eta + j, r.m, r.s, x, pv, d1, d2);
    st.q[j] = r.p[j] / prefix;
    st.logq[j] = r.logp[j] - log(prefix);
    st.ratio[j] = r.p[j] / st.q[j];
    st.phi[j] = st.ratio[j] + r.p[j] * d1;
    st.e[j] = st.ratio[j] + r.p[j] * st.q[j] * d2;
    obj += r.p[j] * (pv - st.logq[j]);
    lam += st.q[j] * st.phi[j];
  }
  st.obj = obj;
  st.lam = lam;
}

TGTFAST_PHD double mc_objective(const McRow& r, const double* z, double* tmp_w, double* tmp_q, double* tmp_lq,
                           double* tmp_x) {
  softmax_parts(z, r.s, tmp_w, tmp_q, tmp_lq, tmp_x);
  double obj = 0.0;
  for (int j = 0; j < r.s; ++j) obj += r.p[j] * (poly_value(r.eta + j, r.m, r.s, tmp_x[j]) - tmp_lq[j]);
  return obj;
}

TGTFAST_PHD double mc_residual(const McState& st, int s) {
  double res = 0.0;
  for (int j = 0; j < s; ++j) res = fmax(res, fabs(st.phi[j] - st.lam));
  return res;
}

// Solve one row. p_full [k] (sums to 1), eta_full [m, k]; writes q_full [k]; returns the final residual.
TGTFAST_PHD double solve_multiclass(const double* p_full, const double* eta_full, int k, int m, int max_iter, double tol,
                               double* q_full, Workspace& ws) {
  int s = 0;
  for (int j = 0; j < k; ++j)
    if (p_full[j] > 0) ws.idx[s++] = j;
  for (int j = 0; j < k; ++j) q_full[j] = 0.0;
  if (s <= 1) {
    if (s == 1) q_full[ws.idx[0]] = 1.0;
    return 0.0;
  }
  double* b = ws.buf;  // carve the scratch into arrays of the support size
  double* p = b;
  double* logp = p + s;
  double* eta = logp + s;
  double* z = eta + m * s;
  double* zt = z + s;
  double* dz = zt + s;
  double* tw = dz + s;
  double* tx = tw + s;
  double* tq = tx + s;
  double* tl = tq + s;
  double* st0 = tl + s;
  McState cur{st0, st0 + s, st0 + 2 * s, st0 + 3 * s, st0 + 4 * s, 0.0, 0.0};
  McState trial{st0 + 5 * s, st0 + 6 * s, st0 + 7 * s, st0 + 8 * s, st0 + 9 * s, 0.0, 0.0};
  for (int a = 0; a < s; ++a) {
    const int j = ws.idx[a];
    p[a] = p_full[j];
    logp[a] = log(p[a]);
    z[a] = logp[a];
    for (int i = 0; i < m; ++i) eta[i * s + a] = eta_full[i * k + j];
  }
  const McRow row{s, m, p, logp, eta};
  mc_state_at_teacher(row, tx, cur);
  double res = mc_residual(cur, s);
  for (int it = 0; it < max_iter && res > tol; ++it) {
    // constrained Newton step, mapped to the logits
    int nneg = 0;
    double sw = 0.0;
    for (int a = 0; a < s; ++a) {
      nneg += cur.e[a] <= 0.0;
      sw += cur.q[a] / cur.e[a];
    }
    const bool ok = nneg == 0 || (nneg == 1 && sw < -1e-300);
    if (!ok) {
      sw = 0.0;
      for (int a = 0; a < s; ++a) {
        if (!(cur.e[a] > 0.01 * cur.ratio[a])) cur.e[a] = cur.ratio[a];
        sw += cur.q[a] / cur.e[a];
      }
    }
    double mu = 0.0;
    for (int a = 0; a < s; ++a) mu += cur.q[a] / cur.e[a] * cur.phi[a];
    mu /= sw;
    double slope = 0.0, dmax = 0.0;
    for (int a = 0; a < s; ++a) {
      const double dev = cur.phi[a] - mu;
      dz[a] = dev / cur.e[a];
      slope -= cur.q[a] / cur.e[a] * dev * dev;
      dmax = fmax(dmax, fabs(dz[a]));
    }
    double t = fmin(1.0, 30.0 / fmax(dmax, 1e-300));
    const double slack = 1e-14 * (1.0 + fabs(cur.obj));
    for (int a = 0; a < s; ++a) zt[a] = z[a] + t * dz[a];
    mc_state(row, zt, tw, tx, trial);
    bool stalled = false;
    if (!(trial.obj <= cur.obj + 1e-4 * t * slope + slack)) {  // Armijo backtracking, objective only
      bool found = false;
      for (int bt = 0; bt < 60 && !found; ++bt) {
        t *= 0.5;
        for (int a = 0; a < s; ++a) zt[a] = z[a] + t * dz[a];
        const double f = mc_objective(row, zt, tw, tq, tl, tx);
        found = f <= cur.obj + 1e-4 * t * slope + slack;
      }
      if (found) {
        mc_state(row, zt, tw, tx, trial);
      } else {  // round-off level: keep the current point and stop
        stalled = true;
      }
    }
    if (stalled) break;
    for (int a = 0; a < s; ++a) z[a] = zt[a];
    const McState held = cur;
    cur = trial;
    trial = held;
    res = mc_residual(cur, s);
  }
  for (int a = 0; a < s; ++a) q_full[ws.idx[a]] = cur.q[a];
  return res;
}

// ------------------------------------------------------------------------------------------------------------
// binary (K = 2): global minimiser in u = logit(q_0)
// ------------------------------------------------------------------------------------------------------------

constexpr double kUMax = 700.0;

TGTFAST_PHD double log_sigmoid(double u) { return u >= 0 ? -log1p(exp(-u)) : u - log1p(exp(u)); }
TGTFAST_PHD double sigmoid(double u) {
  if (u >= 0) return 1.0 / (1.0 + exp(-u));
  const double e = exp(u);
  return e / (1.0 + e);
}

struct BinRow {
  double p0, p1, c;  // c = sum p log p
  const double* e0;  // eta[:, 0], stride 2
  const double* e1;  // eta[:, 1], stride 2
  int m;
};

TGTFAST_PHD double bin_f(const BinRow& r, double u) {
  const double lq0 = log_sigmoid(u), lq1 = log_sigmoid(-u);
  return r.c - r.p0 * lq0 - r.p1 * lq1 + r.p0 * poly_value(r.e0, r.m, 2, exp(lq1)) +
         r.p1 * poly_value(r.e1, r.m, 2, exp(lq0));
}

TGTFAST_PHD void bin_derivs(const BinRow& r, double u, double& fu, double& fuu) {
  const double q0 = sigmoid(u), q1 = sigmoid(-u), s = q0 * q1;
  double av, a1, a2, bv, b1, b2;
  poly(r.e0, r.m, 2, q1, av, a1, a2);
  poly(r.e1, r.m, 2, q0, bv, b1, b2);
  const double tt = r.p1 * b1 - r.p0 * a1;
  const double lin = q0 < 0.5 ? q0 - r.p0 : r.p1 - q1;
  fu = lin + s * tt;
  fuu = s + s * (q1 - q0) * tt + s * s * (r.p1 * b2 + r.p0 * a2);
}

TGTFAST_PHD double xlogx(double x) { return x > 0 ? x * log(x) : 0.0; }

TGTFAST_PHD double clamp_u(double u) { return fmin(fmax(u, -kUMax), kUMax); }

// Returns u = logit(q_0) of the global minimiser (may be +-inf at an exact boundary).
TGTFAST_PHD double solve_binary(const double* p, const double* eta, int m) {
  const double p0 = p[0], p1 = p[1];
  const BinRow r{p0, p1, xlogx(p0) + xlogx(p1), eta, eta + 1, m};
  double bnd = 0.0;
  for (int j = 0; j < 2; ++j) {
    double acc = 0.0;
    for (int i = 0; i < m; ++i) acc += (i + 1) * fabs(eta[i * 2 + j]);
    bnd = fmax(bnd, acc);
  }
  const double lo = p0 / (1 + bnd), hi_c = p1 / (1 + bnd);
  const double u_lo = clamp_u(log(lo) - log1p(-lo));
  const double u_hi = clamp_u(log1p(-hi_c) - log(hi_c));
  constexpr int kLin = 41, kLog = 25, kG = kLin + kLog + 1;
  double grid[kG];
  int g = 0;
  for (int i = 0; i < kLin; ++i) {
    const double t = static_cast<double>(i) / (kLin - 1);
    const double q = lo + (1 - lo - hi_c) * t;
    grid[g++] = clamp_u(log(q) - log1p(-q));
  }
  for (int i = 1; i <= kLog; ++i) grid[g++] = u_lo + (u_hi - u_lo) * (static_cast<double>(i) / (kLog + 1));
  grid[g++] = clamp_u(log(p0) - log(p1));
  for (int i = 1; i < g; ++i) {  // insertion sort (67 values)
    const double v = grid[i];
    int j = i - 1;
    for (; j >= 0 && grid[j] > v; --j) grid[j + 1] = grid[j];
    grid[j + 1] = v;
  }
  int distinct = 1;  // neighbours are the nearest distinct values
  for (int i = 1; i < g; ++i)
    if (grid[i] != grid[distinct - 1]) grid[distinct++] = grid[i];
  g = distinct;
  double fg[kG];
  for (int i = 0; i < g; ++i) fg[i] = bin_f(r, grid[i]);
  // the best three local minima of the grid
  constexpr int kBest = 3;
  int best[kBest];
  int nb = 0;
  for (int i = 0; i < g; ++i) {
    const double left = i > 0 ? fg[i - 1] : INFINITY, right = i + 1 < g ? fg[i + 1] : INFINITY;
    if (!(fg[i] <= left && fg[i] <= right)) continue;
    int pos = nb < kBest ? nb++ : kBest;
    if (pos == kBest) {
      if (!(fg[i] < fg[best[kBest - 1]])) continue;
      pos = kBest - 1;
    }
    while (pos > 0 && fg[i] < fg[best[pos - 1]]) {
      best[pos] = best[pos - 1];
      --pos;
    }
    best[pos] = i;
  }
  const double gr = 0.6180339887498949;  // (sqrt(5) - 1) / 2
  double u_best = grid[0], f_best = INFINITY;
  for (int bi = 0; bi < nb; ++bi) {
    const int i = best[bi];
    const double a = grid[i > 0 ? i - 1 : 0], b = grid[i + 1 < g ? i + 1 : g - 1];
    const double u0 = grid[i], f0 = fg[i];
    double x1 = b - gr * (b - a), x2 = a + gr * (b - a);
    double f1 = bin_f(r, x1), f2 = bin_f(r, x2), lo_b = a, hi_b = b;
    for (int it = 0; it < 44; ++it) {
      if (f1 <= f2) {
        hi_b = x2;
        x2 = x1;
        f2 = f1;
        x1 = hi_b - gr * (hi_b - lo_b);
        f1 = bin_f(r, x1);
      } else {
        lo_b = x1;
        x1 = x2;
        f1 = f2;
        x2 = lo_b + gr * (hi_b - lo_b);
        f2 = bin_f(r, x2);
      }
    }
    double u = f1 <= f2 ? x1 : x2, fu = fmin(f1, f2);
    if (f0 < fu) {
      u = u0;
      fu = f0;
    }
    for (int it = 0; it < 5; ++it) {  // Newton polish inside the bracket
      double d1, d2;
      bin_derivs(r, u, d1, d2);
      const double step = d2 > 0 ? -d1 / d2 : 0.0;
      const double un = fmin(fmax(u + step, a), b);
      const double fn = bin_f(r, un);
      double dn, dd;
      bin_derivs(r, un, dn, dd);
      if (fn <= fu + 1e-15 * (1 + fabs(fu)) && fabs(dn) <= fabs(d1)) {
        u = un;
        fu = fn;
      }
    }
    if (fu < f_best) {
      f_best = fu;
      u_best = u;
    }
  }
  if (p0 == 0 && r.c + p1 * poly_value(r.e1, m, 2, 0.0) <= f_best) return -INFINITY;
  if (p1 == 0 && r.c + p0 * poly_value(r.e0, m, 2, 0.0) <= f_best) return INFINITY;
  return u_best;
}

// q* for one row; returns the stationarity residual for K >= 3 and 0 for K <= 2 (where the solve is global).
TGTFAST_PHD double solve_row(const double* p, const double* eta, int k, int m, int max_iter, double tol, double* q,
                        Workspace& ws) {
  if (k == 1) {
    q[0] = 1.0;
    return 0.0;
  }
  if (k == 2) {
    const double u = solve_binary(p, eta, m);
    q[0] = sigmoid(u);
    q[1] = sigmoid(-u);
    return 0.0;
  }
  return solve_multiclass(p, eta, k, m, max_iter, tol, q, ws);
}

}  // namespace proxy
}  // namespace tgtfast
