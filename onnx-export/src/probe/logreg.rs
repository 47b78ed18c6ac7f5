//! Binary logistic regression with an L2 penalty, fitted in float64 by L-BFGS.
//!
//! The objective, for rows `x_i` with labels `y_i ∈ {0, 1}`:
//!
//! ```text
//! f(w, b) = (1/n) Σ_i [softplus(z_i) - y_i z_i] + (λ/2) ‖w‖²,   z_i = x_i·w + b
//! ∇_w f = (1/n) Xᵀ(σ(z) - y) + λ w,   ∂_b f = (1/n) Σ_i (σ(z_i) - y_i)
//! ```
//!
//! (the mean negative log-likelihood; the bias is not penalised). It is strictly convex in `w`
//! for λ > 0, so L-BFGS converges to the one optimum. The caller standardises the columns first
//! (see [`super::train_probe`]), which makes the problem well conditioned and the penalty
//! independent of the units of each column.
//!
//! Line search: backtracking from the quasi-Newton step, accepting a step that satisfies the
//! Armijo condition or, near the optimum where differences of `f` drown in rounding (`f` is a
//! mean of `n` terms, its rounding error is about 1e-16·|f|, while the decrease of a step is
//! about ‖∇f‖²), Hager and Zhang's approximate Wolfe conditions, which test the directional
//! derivative instead: it is computed to about 1e-14 and keeps the solver going down to
//! gradients of 1e-10.

use ndarray::{Array1, ArrayView1, ArrayView2, s};
use tiller_runtime::dictionary::reference::sigmoid;

/// Settings of [`fit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// λ of the penalty `(λ/2)‖w‖²`.
    pub l2: f64,
    /// Iterations at most.
    pub max_iter: usize,
    /// Converged once `‖∇f‖∞` is at most this.
    pub gtol: f64,
    /// Correction pairs kept by L-BFGS.
    pub memory: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            l2: 1e-3,
            max_iter: 1000,
            gtol: 1e-9,
            memory: 10,
        }
    }
}

/// A fitted model: `P(y = 1 | x) = σ(x·w + b)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    /// The weights.
    pub w: Array1<f64>,
    /// The bias.
    pub b: f64,
    /// `f(w, b)`.
    pub objective: f64,
    /// `‖∇f(w, b)‖∞`.
    pub grad_norm: f64,
    /// L-BFGS iterations taken.
    pub iterations: usize,
    /// Whether `‖∇f‖∞ ≤ gtol` was reached.
    pub converged: bool,
}

/// `log(1 + e^z)` without overflow.
pub fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

/// The objective and its gradient at `θ = (w, b)` (`θ` has `d + 1` entries, `b` last); `y` holds
/// 0 and 1.
pub fn objective(
    x: ArrayView2<'_, f64>,
    y: ArrayView1<'_, f64>,
    l2: f64,
    theta: ArrayView1<'_, f64>,
) -> (f64, Array1<f64>) {
    let (n, d) = x.dim();
    let w = theta.slice(s![..d]);
    let b = theta[d];
    let z = x.dot(&w);
    let nf = n.max(1) as f64;
    let mut loss = 0.0;
    let mut r = Array1::<f64>::zeros(n);
    for i in 0..n {
        let zi = z[i] + b;
        loss += softplus(zi) - y[i] * zi;
        r[i] = sigmoid(zi) - y[i];
    }
    let mut g = Array1::<f64>::zeros(d + 1);
    let gw = x.t().dot(&r) / nf + &(&w * l2);
    g.slice_mut(s![..d]).assign(&gw);
    g[d] = r.sum() / nf;
    (loss / nf + 0.5 * l2 * w.dot(&w), g)
}

fn inf_norm(v: &Array1<f64>) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// Fits the model to `x` (`[n, d]`) and `y` (`[n]`, 0 or 1), starting from `w = 0` and `b` at
/// the log-odds of the labels.
pub fn fit(x: ArrayView2<'_, f64>, y: ArrayView1<'_, f64>, opts: &Options) -> Fit {
    let d = x.ncols();
    let eval = |t: &Array1<f64>| objective(x, y, opts.l2, t.view());
    let mut theta = Array1::<f64>::zeros(d + 1);
    let p = y.mean().unwrap_or(0.5).clamp(1e-12, 1.0 - 1e-12);
    theta[d] = (p / (1.0 - p)).ln();
    let (mut f, mut g) = eval(&theta);
    // Correction pairs (s, y, 1/sᵀy), oldest first.
    let mut pairs: std::collections::VecDeque<(Array1<f64>, Array1<f64>, f64)> =
        std::collections::VecDeque::new();
    let mut iterations = 0;
    while iterations < opts.max_iter && inf_norm(&g) > opts.gtol {
        iterations += 1;
        let mut dir = direction(&g, &pairs);
        let mut gd = g.dot(&dir);
        if gd >= 0.0 || gd.is_nan() {
            // Not a descent direction (rounding): start the memory afresh.
            pairs.clear();
            dir = -&g;
            gd = g.dot(&dir);
        }
        let step = if pairs.is_empty() {
            // Steepest descent: a first step of unit length.
            (1.0 / g.dot(&g).sqrt()).min(1.0)
        } else {
            1.0
        };
        match line_search(&eval, &theta, f, gd, &dir, step) {
            Some((t, f_new, g_new)) => {
                let s_k = &dir * t;
                let y_k = &g_new - &g;
                let sy = s_k.dot(&y_k);
                if sy > 1e-300 && sy.is_finite() {
                    pairs.push_back((s_k.clone(), y_k, 1.0 / sy));
                    if pairs.len() > opts.memory.max(1) {
                        pairs.pop_front();
                    }
                }
                theta += &s_k;
                f = f_new;
                g = g_new;
            }
            None if !pairs.is_empty() => pairs.clear(),
            // No step along steepest descent lowers the objective: this is as close as
            // float64 gets.
            None => break,
        }
    }
    let grad_norm = inf_norm(&g);
    Fit {
        w: theta.slice(s![..d]).to_owned(),
        b: theta[d],
        objective: f,
        grad_norm,
        iterations,
        converged: grad_norm <= opts.gtol,
    }
}

/// The L-BFGS direction `-H g` (two-loop recursion, `H₀ = (sᵀy / yᵀy) I`).
fn direction(
    g: &Array1<f64>,
    pairs: &std::collections::VecDeque<(Array1<f64>, Array1<f64>, f64)>,
) -> Array1<f64> {
    let mut q = g.clone();
    let mut alpha = vec![0.0; pairs.len()];
    for (i, (s, y, rho)) in pairs.iter().enumerate().rev() {
        alpha[i] = rho * s.dot(&q);
        q.scaled_add(-alpha[i], y);
    }
    if let Some((s, y, _)) = pairs.back() {
        q *= s.dot(y) / y.dot(y);
    }
    for (i, (s, y, rho)) in pairs.iter().enumerate() {
        let beta = rho * y.dot(&q);
        q.scaled_add(alpha[i] - beta, s);
    }
    -q
}

/// Backtracking from `t`: the first step that satisfies Armijo or the approximate Wolfe
/// conditions; `None` after 60 halvings.
#[allow(clippy::type_complexity)]
fn line_search(
    eval: &dyn Fn(&Array1<f64>) -> (f64, Array1<f64>),
    theta: &Array1<f64>,
    f: f64,
    gd: f64,
    dir: &Array1<f64>,
    mut t: f64,
) -> Option<(f64, f64, Array1<f64>)> {
    const C1: f64 = 1e-4;
    const SIGMA: f64 = 0.9;
    const DELTA: f64 = 0.1;
    for _ in 0..60 {
        let trial = theta + &(dir * t);
        let (f_new, g_new) = eval(&trial);
        if f_new.is_finite() {
            let armijo = f_new <= f + C1 * t * gd;
            let gd_new = g_new.dot(dir);
            let approx_wolfe = f_new <= f + 1e-12 * f.abs()
                && SIGMA * gd <= gd_new
                && gd_new <= (2.0 * DELTA - 1.0) * gd;
            if armijo || approx_wolfe {
                return Some((t, f_new, g_new));
            }
        }
        t *= 0.5;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn gradient_matches_central_differences() {
        let x = Array2::from_shape_fn((7, 3), |(i, j)| ((i * 3 + j) as f64 * 0.37).sin() * 2.0);
        let y = Array1::from_iter((0..7).map(|i| f64::from(u8::from(i % 3 == 0))));
        let theta = Array1::from(vec![0.3, -0.7, 1.1, 0.2]);
        let (_, g) = objective(x.view(), y.view(), 0.05, theta.view());
        for k in 0..4 {
            let h = 1e-6;
            let mut p = theta.clone();
            p[k] += h;
            let mut m = theta.clone();
            m[k] -= h;
            let fd = (objective(x.view(), y.view(), 0.05, p.view()).0
                - objective(x.view(), y.view(), 0.05, m.view()).0)
                / (2.0 * h);
            assert!((fd - g[k]).abs() < 1e-8, "coordinate {k}: {fd} vs {}", g[k]);
        }
    }

    #[test]
    fn softplus_is_stable() {
        assert_eq!(softplus(1000.0), 1000.0);
        assert!(softplus(-1000.0) >= 0.0 && softplus(-1000.0) < 1e-300);
        assert!((softplus(0.0) - 2f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn separable_data_converge_with_a_penalty() {
        // Perfectly separable: without a penalty the weights would grow without bound.
        let x = Array2::from_shape_fn((40, 2), |(i, j)| {
            let c = if i < 20 { 1.0 } else { -1.0 };
            c * (1.0 + j as f64) + ((i * 7 + j) as f64).sin() * 0.3
        });
        let y = Array1::from_iter((0..40).map(|i| f64::from(u8::from(i < 20))));
        let fit = fit(x.view(), y.view(), &Options::default());
        assert!(fit.converged, "{fit:?}");
        assert!(fit.grad_norm <= 1e-9);
    }
}
