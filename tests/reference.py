"""Dense float64 references, built without any of curvlab's code.

Everything here is derived from first principles with ``torch.func`` and plain
autograd so that the tests can compare curvlab against an independent answer:

* the GGN ``Jᵀ ∇²_f L J`` from full Jacobians and the Hessian of the loss
  w.r.t. the model output;
* the empirical Fisher from per-sample gradients (``vmap(grad(...))``);
* ``s Σ_nc J_nᵀ g_nc g_ncᵀ J_n`` for arbitrary output-space columns ``g``
  (checks the Monte-Carlo Fisher exactly, given curvlab's sampled columns);
* per-layer inputs and output gradients from forward hooks, with conv patches
  obtained as the Jacobian of the (linear) convolution w.r.t. its weight, so no
  unfold bookkeeping is shared with the implementation;
* dense KFAC, FOOF and EKFAC matrices from those records.

Conventions (the contract in the task brief and DESIGN.md):

* flat layout: ``[p for p in model.parameters() if p.requires_grad]``, each
  flattened row-major;
* ``L = s Σ_n ℓ̃_n`` with ``ℓ̃_n = loss_fn(f_n[None], y_n[None])`` (same
  reduction), ``s = 1/N`` for ``"mean"`` and ``1`` for ``"sum"``;
* ``c = 1/C`` for MSE/BCE with ``"mean"`` (PyTorch averages over all entries),
  else ``1``; ``ℓ̃_n = c ℓ_n`` with ``ℓ_n`` the per-sample loss summed over outputs;
* per-layer ``[W | b]`` matrices are ``d_out x d_in_h`` (``d_in_h = d_in + 1``
  with a trainable bias), and a Kronecker block ``kron(G, A)`` is in row-major
  ``[W | b]`` order; :func:`wb_to_flat` maps it to the flat layout (weight
  entries first, then the bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
DTYPE = torch.float64


# ----------------------------------------------------------------------------------
# parameters and scales
# ----------------------------------------------------------------------------------


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters by name, in ``model.parameters()`` order."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def num_params(model: nn.Module) -> int:
    """``P``: number of trainable parameter entries."""
    return sum(p.numel() for p in trainable_params(model).values())


def flatten(tensors) -> Tensor:
    """Concatenate row-major flattened tensors (flat layout)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def reduction_scale(loss_fn: nn.Module, n: int) -> float:
    """``s``: 1/N for mean reduction, 1 for sum."""
    return 1.0 / n if loss_fn.reduction == "mean" else 1.0


def output_scale(loss_fn: nn.Module, c_out: int) -> float:
    """``c``: 1/C for MSE/BCE with mean reduction, else 1."""
    if loss_fn.reduction == "mean" and not isinstance(loss_fn, nn.CrossEntropyLoss):
        return 1.0 / c_out
    return 1.0


def per_sample_loss(loss_fn: nn.Module, f_n: Tensor, y_n: Tensor) -> Tensor:
    """``ℓ̃_n`` for one sample (the loss module on a batch of one)."""
    return loss_fn(f_n.unsqueeze(0), y_n.unsqueeze(0))


# ----------------------------------------------------------------------------------
# Jacobians, GGN, empirical Fisher
# ----------------------------------------------------------------------------------


def _model_fn(model: nn.Module, X: Tensor):
    names = list(trainable_params(model))

    def f(*values: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, values)), (X,))

    return f


def per_sample_jacobians(model: nn.Module, X: Tensor) -> Tensor:
    """``J`` of shape ``(N, C, P)``: ``J[n] = ∂f(x_n)/∂θ`` in flat layout."""
    params = trainable_params(model)
    values = tuple(p.detach() for p in params.values())
    f = _model_fn(model, X)
    jacs = jacrev(f, argnums=tuple(range(len(values))))(*values)
    n, c = jacs[0].shape[:2]
    return torch.cat([j.reshape(n, c, -1) for j in jacs], dim=2)


def output_hessian(loss_fn: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """``∇²_f L`` of shape ``(N*C, N*C)`` (row-major over ``(n, c)``)."""
    h = hessian(lambda out: loss_fn(out, y))(f.detach())
    return h.reshape(f.numel(), f.numel())


def dense_ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``Jᵀ ∇²_f L J`` over the whole batch, ``(P, P)``."""
    J = per_sample_jacobians(model, X)
    with torch.no_grad():
        f = model(X)
    H = output_hessian(loss_fn, f, y)
    Jf = J.reshape(-1, J.shape[-1])
    return Jf.T @ H @ Jf


def per_sample_gradients(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``∇_θ ℓ̃_n`` of shape ``(N, P)`` via ``vmap(grad(...))``."""
    params = trainable_params(model)
    names = list(params)

    def loss_n(values: tuple[Tensor, ...], x: Tensor, t: Tensor) -> Tensor:
        out = functional_call(model, dict(zip(names, values)), (x.unsqueeze(0),))
        return per_sample_loss(loss_fn, out[0], t)

    values = tuple(p.detach() for p in params.values())
    grads = vmap(grad(loss_n), in_dims=(None, 0, 0))(values, X, y)
    return torch.cat([g.reshape(X.shape[0], -1) for g in grads], dim=1)


def batch_gradient(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``∇_θ L`` with plain autograd, flat layout."""
    params = list(trainable_params(model).values())
    loss = loss_fn(model(X), y)
    return flatten(torch.autograd.grad(loss, params))


def dense_empirical_fisher(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Empirical Fisher, curvlinops' ``EFLinearOperator`` convention.

    ``EF = (s / c) Σ_n ∇ℓ̃_n ∇ℓ̃_nᵀ = s Σ_n (√c ∇ℓ_n)(√c ∇ℓ_n)ᵀ``: the Monte-Carlo
    Fisher's formula with the data labels in place of sampled ones.  For CE, and
    for every loss with ``"sum"``, ``c = 1`` and this is ``s Σ ∇ℓ̃_n ∇ℓ̃_nᵀ``.
    """
    G = per_sample_gradients(model, loss_fn, X, y)
    with torch.no_grad():
        c_out = model(X[:1]).shape[1]
    s = reduction_scale(loss_fn, X.shape[0])
    c = output_scale(loss_fn, c_out)
    return (s / c) * G.T @ G


def dense_fisher_from_columns(model: nn.Module, X: Tensor, columns: Tensor, scale: float) -> Tensor:
    """``s Σ_n Σ_c J_nᵀ g_nc g_ncᵀ J_n`` for columns ``(C', N, C)``."""
    U = column_gradients(model, X, columns)  # (C', N, P)
    U = U.reshape(-1, U.shape[-1])
    return scale * U.T @ U


def column_gradients(model: nn.Module, X: Tensor, columns: Tensor) -> Tensor:
    """``J_nᵀ g_nc`` for every column, ``(C', N, P)``."""
    J = per_sample_jacobians(model, X)
    return torch.einsum("knc,ncp->knp", columns.to(J.dtype), J)


# ----------------------------------------------------------------------------------
# output-space columns
# ----------------------------------------------------------------------------------


def per_sample_output_hessians(loss_fn: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """``∇²_f ℓ̃_n`` for every sample, ``(N, C, C)``."""
    f = f.detach()
    return torch.stack(
        [hessian(lambda out, t=t: per_sample_loss(loss_fn, out, t))(fn) for fn, t in zip(f, y)]
    )


def hessian_sqrt_columns(loss_fn: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """Columns ``(C, N, C)`` of the symmetric square root of ``∇²_f ℓ̃_n`` (via eigh)."""
    H = per_sample_output_hessians(loss_fn, f, y)
    w, V = torch.linalg.eigh(H)
    S = V * w.clamp_min(0).sqrt().unsqueeze(1)  # V diag(sqrt w): S Sᵀ = H
    return S.permute(2, 0, 1).contiguous()


def empirical_columns(loss_fn: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """Columns ``(1, N, C)``: ``√c ∇_f ℓ_n = ∇_f ℓ̃_n / √c`` at the data labels."""
    f = f.detach()
    g = torch.stack(
        [grad(lambda out, t=t: per_sample_loss(loss_fn, out, t))(fn) for fn, t in zip(f, y)]
    )
    c = output_scale(loss_fn, f.shape[1])
    return (g / c**0.5).unsqueeze(0)


# ----------------------------------------------------------------------------------
# per-layer records (inputs, output gradients) from hooks
# ----------------------------------------------------------------------------------


@dataclass
class LayerRecord:
    """One supported layer: homogeneous inputs ``a`` (N, T, d_in_h), output
    gradients ``e`` (C', N, T, d_out), sizes and its flat offset."""

    name: str
    a: Tensor
    e: Tensor
    d_in: int
    d_out: int
    has_bias: bool
    offset: int

    @property
    def d_in_h(self) -> int:
        return self.d_in + int(self.has_bias)

    @property
    def size(self) -> int:
        return self.d_out * self.d_in_h

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    def per_column_gradients(self) -> Tensor:
        """``Gr_nc = Σ_t e_nct ā_ntᵀ`` of shape ``(C', N, d_out, d_in_h)``."""
        return torch.einsum("knto,ntj->knoj", self.e, self.a)


def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Supported layers with a trainable weight, in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, SUPPORTED) and m.weight.requires_grad
    ]


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """Inputs that the layer's weight matrix multiplies, ``(N, T, d_in)``.

    Linear: leading dims flattened into ``T``.  Conv: the Jacobian of output
    channel 0 w.r.t. weight row 0 (the convolution is linear in its weight), so
    padding, stride, dilation and "same" padding are handled by PyTorch itself.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    w = module.weight.detach()

    def conv0(w0: Tensor) -> Tensor:
        weight = torch.cat([w0.unsqueeze(0), torch.zeros_like(w[1:])])
        return module._conv_forward(x, weight, None)[:, 0]  # (N, *spatial)

    jac = jacrev(conv0)(w[0])  # (N, *spatial, C_in, *k)
    n = x.shape[0]
    spatial = jac.shape[1 : 1 + (x.dim() - 2)]
    t = 1
    for s in spatial:
        t *= s
    return jac.reshape(n, t, -1)


def _output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Output(-gradient) ``(N, ...)`` -> ``(N, T, d_out)`` in the order of :func:`_patches`."""
    if isinstance(module, nn.Linear):
        return g.reshape(g.shape[0], -1, g.shape[-1])
    return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)


def layer_records(model: nn.Module, X: Tensor, columns: Tensor) -> list[LayerRecord]:
    """Forward hooks + one autograd call per column (``columns``: (C', N, C))."""
    layers = supported_layers(model)
    saved: dict[str, tuple[Tensor, Tensor]] = {}

    def make_hook(name: str):
        def hook(module, args, out):
            saved[name] = (args[0].detach(), out)
            # downstream gets a copy, so in-place activations cannot overwrite `out`
            return out.clone()

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in layers]
    try:
        with torch.enable_grad():
            f = model(X.detach())
    finally:
        for h in handles:
            h.remove()
    outs = [saved[name][1] for name, _ in layers]
    per_col = []
    for k in range(columns.shape[0]):
        gs = torch.autograd.grad(
            f, outs, grad_outputs=columns[k].to(f.dtype), retain_graph=True, allow_unused=True
        )
        per_col.append([torch.zeros_like(o) if g is None else g.detach() for g, o in zip(gs, outs)])
    records = []
    offset = 0
    for i, (name, m) in enumerate(layers):
        x, out = saved[name]
        a = _patches(m, x)
        has_bias = m.bias is not None and m.bias.requires_grad
        if has_bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        e = torch.stack([_output_rows(m, cols[i]) for cols in per_col])
        rec = LayerRecord(name, a, e, a.shape[-1] - int(has_bias), e.shape[-1], has_bias, offset)
        records.append(rec)
        offset += rec.size
    return records


# ----------------------------------------------------------------------------------
# layout helpers
# ----------------------------------------------------------------------------------


def wb_index(d_out: int, d_in: int, has_bias: bool) -> Tensor:
    """``idx`` with ``flat[idx[i]] = [W | b].flatten()[i]`` (row-major ``[W | b]``)."""
    d_in_h = d_in + int(has_bias)
    o = torch.arange(d_out).unsqueeze(1).expand(d_out, d_in_h)
    k = torch.arange(d_in_h).unsqueeze(0).expand(d_out, d_in_h)
    idx = torch.where(k < d_in, o * d_in + k, d_out * d_in + o)
    return idx.reshape(-1)


def wb_to_flat(block: Tensor, rec: LayerRecord) -> Tensor:
    """Reorder a ``[W | b]``-row-major square block to flat layout."""
    idx = wb_index(rec.d_out, rec.d_in, rec.has_bias)
    out = torch.empty_like(block)
    out[idx.unsqueeze(1), idx.unsqueeze(0)] = block
    return out


def wb_vec_to_flat(vec: Tensor, rec: LayerRecord) -> Tensor:
    """Reorder a ``[W | b]``-row-major vector to flat layout."""
    idx = wb_index(rec.d_out, rec.d_in, rec.has_bias)
    out = torch.empty_like(vec)
    out[idx] = vec
    return out


def flat_to_wb(vec: Tensor, rec: LayerRecord) -> Tensor:
    """A layer's flat slice -> ``[W | b]`` matrix ``(d_out, d_in_h)``."""
    idx = wb_index(rec.d_out, rec.d_in, rec.has_bias)
    return vec[idx].reshape(rec.d_out, rec.d_in_h)


def block_diagonal_part(M: Tensor, records: list[LayerRecord]) -> Tensor:
    """Zero everything of ``M`` outside the per-layer diagonal blocks."""
    out = torch.zeros_like(M)
    for r in records:
        out[r.slice, r.slice] = M[r.slice, r.slice]
    return out


# ----------------------------------------------------------------------------------
# Kronecker-factored references
# ----------------------------------------------------------------------------------


def kfac_factors(rec: LayerRecord, scale: float) -> tuple[Tensor, Tensor]:
    """``(A, G)``: ``A = Σ_{n,t} ā āᵀ / (N T)``, ``G = s Σ_{n,c,t} e eᵀ``."""
    n, t = rec.a.shape[:2]
    A = torch.einsum("ntk,ntj->kj", rec.a, rec.a) / (n * t)
    G = scale * torch.einsum("knto,kntp->op", rec.e, rec.e)
    return A, G


def dense_kfac(records: list[LayerRecord], scale: float) -> Tensor:
    """Block-diagonal KFAC, ``kron(G, A)`` per layer, flat layout."""
    blocks = []
    for r in records:
        A, G = kfac_factors(r, scale)
        blocks.append(wb_to_flat(torch.kron(G, A), r))
    return torch.block_diag(*blocks)


def dense_foof(records: list[LayerRecord]) -> Tensor:
    """FOOF: ``kron(I_{d_out}, A)`` per layer, flat layout."""
    blocks = []
    for r in records:
        A, _ = kfac_factors(r, 1.0)
        eye = torch.eye(r.d_out, dtype=A.dtype)
        blocks.append(wb_to_flat(torch.kron(eye, A), r))
    return torch.block_diag(*blocks)


def ekfac_parts(rec: LayerRecord, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(Q_G, Q_A, S)``: KFAC eigenbases and the EKFAC diagonal ``S`` (d_out x d_in_h)."""
    A, G = kfac_factors(rec, scale)
    _, QA = torch.linalg.eigh(A)
    _, QG = torch.linalg.eigh(G)
    Gr = rec.per_column_gradients()  # (C', N, d_out, d_in_h)
    rot = QG.T @ Gr @ QA
    S = scale * rot.square().sum(dim=(0, 1))
    return QG, QA, S


def dense_ekfac(records: list[LayerRecord], scale: float) -> Tensor:
    """EKFAC: ``(Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ`` per layer, flat layout."""
    blocks = []
    for r in records:
        QG, QA, S = ekfac_parts(r, scale)
        Q = torch.kron(QG, QA)
        blocks.append(wb_to_flat(Q @ torch.diag(S.reshape(-1)) @ Q.T, r))
    return torch.block_diag(*blocks)


def dense_exact_blocks(records: list[LayerRecord], scale: float) -> Tensor:
    """Block-diagonal exact Fisher from per-column layer gradients (self-check path)."""
    blocks = []
    for r in records:
        Gr = r.per_column_gradients().reshape(-1, r.size)
        blocks.append(wb_to_flat(scale * Gr.T @ Gr, r))
    return torch.block_diag(*blocks)


def kfac_heuristic_dense(rec: LayerRecord, scale: float, damping: float) -> Tensor:
    """``(G + √λ/π I) ⊗ (A + π√λ I)`` in flat layout (its inverse is KFAC-heuristic)."""
    A, G = kfac_factors(rec, scale)
    pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
    r = damping**0.5
    IA = torch.eye(A.shape[0], dtype=A.dtype)
    IG = torch.eye(G.shape[0], dtype=G.dtype)
    return wb_to_flat(torch.kron(G + r / pi * IG, A + pi * r * IA), rec)


# ----------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------


def rel_err(x: Tensor, ref: Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` (absolute when ``ref`` is zero), in float64."""
    x = x.detach().to("cpu", DTYPE)
    ref = ref.detach().to("cpu", DTYPE)
    assert x.shape == ref.shape, f"shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    den = ref.norm()
    num = (x - ref).norm()
    return float(num / den) if den > 0 else float(num)


def spectrum_err(eigs: Tensor, ref: Tensor) -> float:
    """Error between two spectra that may differ in the number of (zero) eigenvalues.

    Both are zero-padded to the same length and sorted; the error is the largest
    absolute difference relative to the largest reference eigenvalue.
    """
    a = eigs.detach().to("cpu", DTYPE).reshape(-1)
    b = ref.detach().to("cpu", DTYPE).reshape(-1)
    m = max(a.numel(), b.numel())
    a = torch.cat([a, a.new_zeros(m - a.numel())]).sort().values
    b = torch.cat([b, b.new_zeros(m - b.numel())]).sort().values
    top = b.abs().max()
    return float((a - b).abs().max() / top) if top > 0 else float((a - b).abs().max())


# ----------------------------------------------------------------------------------
# interface check: every member of a curvature object against one dense matrix
# ----------------------------------------------------------------------------------


def random_vector(n: int, dtype: torch.dtype = DTYPE, seed: int = 0) -> Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE).to(dtype)


def interface_errors(
    obj,
    D: Tensor,
    dampings=(),
    damped=None,
    spectrum: Tensor | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Relative errors of ``obj``'s members against the dense reference ``D``.

    Args:
        obj: A curvature object (``mv``, ``solve``, ``to_dense``, ``eigvalsh``,
            ``trace``, ``frobenius_norm``, ``as_linear_operator``).
        D: Its dense float64 reference in flat layout.
        dampings: λ values for which ``solve`` is checked.
        damped: ``λ -> M`` with ``solve(v, λ) = M⁻¹ v`` (default ``D + λI``).
        spectrum: Reference eigenvalues (default ``eigvalsh(D)``); compared after
            zero-padding (:func:`spectrum_err`).
    """
    D = D.to(DTYPE)
    n = D.shape[0]
    v = random_vector(n, seed=seed)
    vo = v.to(obj.dtype) if hasattr(obj, "dtype") else v
    errs: dict[str, float] = {}
    errs["to_dense"] = rel_err(obj.to_dense(), D)
    errs["mv"] = rel_err(obj.mv(vo), D @ v)
    lo = obj.as_linear_operator()
    errs["as_linear_operator"] = rel_err(torch.as_tensor(lo.matvec(v.numpy())).reshape(-1), D @ v)
    tr = D.trace()
    errs["trace"] = float((obj.trace().to(DTYPE) - tr).abs() / max(tr.abs(), D.norm()))
    fro = D.norm()
    errs["frobenius_norm"] = float((obj.frobenius_norm().to(DTYPE) - fro).abs() / fro)
    ref_spec = torch.linalg.eigvalsh(D) if spectrum is None else spectrum
    errs["eigvalsh"] = spectrum_err(obj.eigvalsh(), ref_spec)
    eye = torch.eye(n, dtype=DTYPE)
    for lam in dampings:
        M = D + lam * eye if damped is None else damped(lam)
        errs[f"solve(λ={lam:g})"] = rel_err(obj.solve(vo, lam), torch.linalg.solve(M, v))
    return errs


def assert_close_all(errs: dict[str, float], rtol: float, what: str = "") -> None:
    """Fail listing every member whose relative error exceeds ``rtol``."""
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= rtol}
    assert not bad, f"{what}: relative errors above {rtol:g}: {bad}"


def assert_capture_grad(capt, model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> None:
    """``Capture.grad`` equals ``torch.autograd.grad`` of the loss (float64, ≤ 1e-8)."""
    params = list(trainable_params(model).values())
    expect = flatten(torch.autograd.grad(loss_fn(model(X), y), params))
    err = rel_err(capt.grad, expect)
    assert err <= 1e-8, f"Capture.grad is off by {err:.1e} relative to autograd"
