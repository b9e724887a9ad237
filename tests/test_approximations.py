"""KFOC, Shampoo, the diagonals, one-batch two-level KFAC and SINGD against dense
float64 references built from hook records (tests/reference.py), RTOL = 1e-8.

* KFOC: the nearest Kronecker product of each exact block from the SVD of its dense
  rearrangement R(B)[(o,o'),(i,i')] = B[(o,i),(o',i')]; its error is never above KFAC's.
* Shampoo²: kron(L, R) / tr B, Shampoo: kron(L^½, R^½), L = s Σ Γ Γᵀ, R = s Σ Γᵀ Γ.
* Diagonals: diag of the dense GGN / empirical Fisher (torch.func, independent of
  capture); the empirical one from any captured Fisher type.
* Two-level: KFAC⁻¹ v + Zᵀ(F_c + λI)⁻¹ Z v with dense KFAC and dense coarse matrices.
* SINGD: kron(Π(G), Π(A)) with the structure's mask; solve with (Π(·) + λI) per factor.
  Hierarchical: the IKFAC fixed point Ŝ = (K Kᵀ)⁻¹ from a block-triangular (Cholesky)
  factorisation S = Lᵀ W L, checked against the fixed-point equation Π̂(Kᵀ S K) = I with
  the dense pattern mask, K = L⁻¹ inside the pattern.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import DAMPINGS, RTOL, get_problem, mc_generator

import curvlab
from curvlab.curvature.singd import SINGDCurvature
from curvlab.curvature.two_level import TwoLevelKFACCurvature
from curvlab.optim.structures import BlockDiagonal, Hierarchical

KFOC_CASES = [
    ("mlp_tanh", "ce-mean", "exact"),
    ("mlp_mixed_bias", "mse-sum", "mc"),
    ("seq_flatten", "bce-mean", "empirical"),
    ("conv2d_stride", "ce-sum", "exact"),
    ("conv1d", "ce-mean", "exact"),
]


def _setup(model_name, loss_name, fisher):
    prob = get_problem(model_name, loss_name)
    capt = prob.capture(fisher, generator=mc_generator(3))
    return prob, capt, prob.ref(fisher, capt)


def _exact_block(rec: R.LayerRecord, scale: float) -> torch.Tensor:
    """The layer's exact block in row-major [W | b] order."""
    g = rec.per_column_gradients().reshape(-1, rec.size)
    return scale * g.T @ g


def _nearest_kronecker(block: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """kron(X, Y) from the top singular triple of the dense rearrangement."""
    rearranged = block.reshape(d_out, d_in, d_out, d_in).permute(0, 2, 1, 3)
    u, s, vh = torch.linalg.svd(rearranged.reshape(d_out * d_out, d_in * d_in))
    x = s[0] * u[:, 0].reshape(d_out, d_out)
    return torch.kron(x, vh[0].reshape(d_in, d_in))


@pytest.mark.parametrize(("model_name", "loss_name", "fisher"), KFOC_CASES)
def test_kfoc_is_the_nearest_kronecker_product(model_name, loss_name, fisher):
    prob, capt, ref = _setup(model_name, loss_name, fisher)
    kfoc = curvlab.KFOC(capt)
    blocks = []
    for rec in ref.records:
        B = _exact_block(rec, ref.scale)
        K = _nearest_kronecker(B, rec.d_out, rec.d_in_h)
        blocks.append(R.wb_to_flat(K, rec))
        A, G = R.kfac_factors(rec, ref.scale)
        err_kfoc = float((K - B).norm())
        assert err_kfoc <= float((torch.kron(G, A) - B).norm()) * (1 + 1e-12)
    D = torch.block_diag(*blocks)
    R.assert_close_all(R.interface_errors(kfoc, D, DAMPINGS), RTOL, f"KFOC {prob}")


def test_kfoc_error_never_above_kfac_in_compare():
    prob = get_problem("conv2d_same_dil", "ce-mean")
    analysis = curvlab.compare.Analysis(prob.model, prob.loss_fn, prob.X, prob.y)
    kfoc = curvlab.compare.relative_errors(analysis, "kfoc")
    kfac = curvlab.compare.relative_errors(analysis, "kfac")
    for layer in analysis.layer_names:
        assert kfoc[layer][0] <= kfac[layer][0] + 1e-12


@pytest.mark.parametrize(("model_name", "loss_name", "fisher"), KFOC_CASES[:4])
@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_shampoo_against_dense(model_name, loss_name, fisher, exponent):
    prob, capt, ref = _setup(model_name, loss_name, fisher)
    shampoo = curvlab.Shampoo(capt, exponent)
    blocks = []
    for rec in ref.records:
        g = rec.per_column_gradients().reshape(-1, rec.d_out, rec.d_in_h)
        left = ref.scale * torch.einsum("moi,mpi->op", g, g)
        right = ref.scale * torch.einsum("moi,moj->ij", g, g)
        if exponent == 1.0:
            K = torch.kron(left, right) / left.trace()
        else:
            K = torch.kron(_sqrtm(left), _sqrtm(right))
        blocks.append(R.wb_to_flat(K, rec))
    D = torch.block_diag(*blocks)
    R.assert_close_all(R.interface_errors(shampoo, D, DAMPINGS), RTOL, f"Shampoo {prob}")


@pytest.mark.parametrize("loss_name", ["ce-mean", "ce-sum"])
@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_shampoo_is_morwanis_formula_on_per_sample_gradients(loss_name, exponent):
    """Morwani et al. with H = E_n[g_n g_nᵀ] the empirical Fisher (its reduction scale s:
    E = s Σ_n, 1/N for a mean loss): per Linear layer, G_n = [∇W | ∇b] of sample n from
    torch.func, L = E[G Gᵀ], R = E[Gᵀ G]; Shampoo² = L ⊗ R / tr H_ll (tr H_ll =
    E‖G‖² = tr L), Shampoo = L^½ ⊗ R^½, in the row-major vec(G) order, moved to the
    parameters' order (weight row-major, then bias) by index, not by capture records."""
    prob = get_problem("mlp_tanh", loss_name)
    capt = curvlab.capture(prob.model, prob.loss_fn, prob.X, prob.y, fisher="empirical")
    grads = R.per_sample_gradients(prob.model, prob.loss_fn, prob.X, prob.y)
    s = 1.0 / prob.X.shape[0] if loss_name == "ce-mean" else 1.0
    blocks, offset = [], 0
    for lin in [m for m in prob.model.modules() if isinstance(m, torch.nn.Linear)]:
        d_out, d_in = lin.weight.shape
        size = d_out * (d_in + 1)
        g = grads[:, offset : offset + size]
        offset += size
        mats = torch.cat(
            [g[:, : d_out * d_in].reshape(-1, d_out, d_in), g[:, d_out * d_in :, None]], 2
        )
        left = s * torch.einsum("noi,npi->op", mats, mats)
        right = s * torch.einsum("noi,noj->ij", mats, mats)
        if exponent == 1.0:
            trace_h = s * mats.square().sum()
            block = torch.kron(left, right) / trace_h
        else:
            block = torch.kron(_sqrtm(left), _sqrtm(right))
        # position of G[o, i] among the layer's parameters: weight row-major, then bias
        index = torch.empty(d_out, d_in + 1, dtype=torch.long)
        index[:, :d_in] = torch.arange(d_out * d_in).reshape(d_out, d_in)
        index[:, d_in] = d_out * d_in + torch.arange(d_out)
        flat = torch.empty_like(block)
        flat[index.reshape(-1, 1), index.reshape(1, -1)] = block
        blocks.append(flat)
    assert offset == grads.shape[1]
    expect = torch.block_diag(*blocks)
    assert R.rel_err(curvlab.Shampoo(capt, exponent).to_dense(), expect) <= RTOL


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    """Square root with eigenvalues at or below the rank tolerance set to 0."""
    values, vectors = torch.linalg.eigh(m)
    tol = m.shape[0] * torch.finfo(m.dtype).eps * values.max()
    return (vectors * torch.where(values > tol, values, 0.0).sqrt()) @ vectors.T


def test_shampoo2_is_exact_for_a_kronecker_block():
    """Morwani et al.'s normalisation: L ⊗ R / tr B = B when B is a Kronecker product,
    as for one sample and one Fisher column of a Linear layer (vec(e aᵀ) = e ⊗ a)."""
    prob = get_problem("mlp_tanh", "mse-mean")
    capt = curvlab.capture(prob.model, prob.loss_fn, prob.X[:1], prob.y[:1], fisher="empirical")
    exact = curvlab.BlockDiagFisher(capt).to_dense()
    assert R.rel_err(curvlab.Shampoo(capt, 1.0).to_dense(), exact) <= RTOL
    assert R.rel_err(curvlab.KFOC(capt).to_dense(), exact) <= RTOL


@pytest.mark.parametrize("model_name", ["mlp_mixed_bias", "conv2d_stride", "seq_mean"])
@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_diagonals_against_dense(model_name, fisher):
    prob = get_problem(model_name, "ce-mean")
    capt = prob.capture(fisher, generator=mc_generator(5))
    F = prob.ggn() if fisher == "exact" else prob.ref("mc", capt).F
    diag = curvlab.DiagFisher(capt)
    R.assert_close_all(
        R.interface_errors(diag, torch.diag(torch.diag(F)), DAMPINGS), RTOL, f"diag {prob}"
    )
    ef = R.dense_empirical_fisher(prob.model, prob.loss_fn, prob.X, prob.y)
    diag_ef = curvlab.DiagEmpiricalFisher(capt)
    R.assert_close_all(
        R.interface_errors(diag_ef, torch.diag(torch.diag(ef)), DAMPINGS), RTOL, f"EF {prob}"
    )


@pytest.mark.parametrize("loss_name", ["mse-mean", "bce-sum"])
def test_diagonal_empirical_fisher_other_losses(loss_name):
    prob = get_problem("mlp_tanh", loss_name)
    capt = prob.capture("exact")
    ef = R.dense_empirical_fisher(prob.model, prob.loss_fn, prob.X, prob.y)
    R.assert_close_all(
        R.interface_errors(curvlab.DiagEmpiricalFisher(capt), torch.diag(torch.diag(ef))),
        RTOL,
        f"EF {prob}",
    )


@pytest.mark.parametrize("coarse_damping", ["paper", "consistent"])
def test_two_level_solve_against_dense(coarse_damping):
    prob, capt, ref = _setup("mlp_mixed_bias", "ce-mean", "exact")
    curv = TwoLevelKFACCurvature(capt, "standard", coarse_damping)
    kfac = R.dense_kfac(ref.records, ref.scale)
    z = torch.zeros(len(ref.records), prob.P, dtype=torch.float64)
    for i, rec in enumerate(ref.records):
        z[i, rec.slice] = 1.0
    fc = z @ kfac @ z.T  # the coarse projection of the KFAC blocks' Kronecker factors
    cross = torch.zeros_like(fc)
    for i, ri in enumerate(ref.records):
        for j, rj in enumerate(ref.records):
            ai = ri.a.sum(-1).reshape(-1)
            aj = rj.a.sum(-1).reshape(-1)
            ei = ri.e.sum(-1).reshape(-1)
            ej = rj.e.sum(-1).reshape(-1)
            cross[i, j] = (ai @ aj / ai.numel()) * ref.scale * (ei @ ej)
    scale = float(fc.abs().max())
    torch.testing.assert_close(torch.diag(cross), torch.diag(fc), rtol=1e-10, atol=1e-14 * scale)
    v = R.random_vector(prob.P, seed=2)
    eye = torch.eye(prob.P, dtype=torch.float64)
    for lam in DAMPINGS:
        shift = torch.ones(len(ref.records), dtype=torch.float64)
        if coarse_damping == "consistent":
            shift = z.sum(1)
        expect = torch.linalg.solve(kfac + lam * eye, v) + z.T @ torch.linalg.solve(
            cross + torch.diag(lam * shift), z @ v
        )
        assert R.rel_err(curv.solve(v, lam), expect) <= RTOL
    R.assert_close_all(R.interface_errors(curv, kfac), RTOL, "two-level matrix")


@pytest.mark.parametrize(
    "structure", ["dense", "diagonal", "block_diagonal", BlockDiagonal(block_size=2)]
)
def test_singd_one_batch_against_dense(structure):
    prob, capt, ref = _setup("mlp_tanh", "ce-mean", "exact")
    curv = SINGDCurvature(capt, structure)
    blocks = []
    for rec in ref.records:
        A, G = R.kfac_factors(rec, ref.scale)
        mask_a, mask_g = _mask(structure, A.shape[0]), _mask(structure, G.shape[0])
        pa, pg = A * mask_a, G * mask_g
        blocks.append((R.wb_to_flat(torch.kron(pg, pa), rec), pa, pg, rec))
    D = torch.block_diag(*[b[0] for b in blocks])

    def damped_matrix(lam):
        parts = []
        for _, pa, pg, rec in blocks:
            eye_a = torch.eye(pa.shape[0], dtype=pa.dtype)
            eye_g = torch.eye(pg.shape[0], dtype=pg.dtype)
            parts.append(R.wb_to_flat(torch.kron(pg + lam * eye_g, pa + lam * eye_a), rec))
        return torch.block_diag(*parts)

    R.assert_close_all(
        R.interface_errors(curv, D, DAMPINGS, damped=damped_matrix), RTOL, f"SINGD {structure}"
    )


def _mask(structure, dim: int) -> torch.Tensor:
    if structure == "dense":
        return torch.ones(dim, dim, dtype=torch.float64)
    if structure == "diagonal":
        return torch.eye(dim, dtype=torch.float64)
    size = 16 if structure == "block_diagonal" else structure.block_size
    index = torch.arange(dim) // size
    return (index[:, None] == index[None, :]).to(torch.float64)


def _hierarchical_sets(dim: int, k1: int, k2: int) -> tuple[list[int], list[int], list[int]]:
    """Index sets I1 (first k1), I2 (middle), I3 (last k2), k1 and k2 clipped to dim."""
    k1 = min(k1, dim)
    k2 = min(k2, dim - k1)
    return list(range(k1)), list(range(k1, dim - k2)), list(range(dim - k2, dim))


def _hierarchical_pattern(dim: int, k1: int, k2: int) -> torch.Tensor:
    """Boolean mask of K: dense rows I1, diagonal I2 x I2, dense I3 x (I2 ∪ I3)."""
    i1, i2, i3 = _hierarchical_sets(dim, k1, k2)
    mask = torch.zeros(dim, dim, dtype=torch.bool)
    mask[i1, :] = True
    mask[i2, i2] = True
    mask[torch.tensor(i3).unsqueeze(1), torch.tensor(i2 + i3).unsqueeze(0)] = True
    return mask


def _ikfac_fixed_point(s: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """Ŝ with Π̂(Kᵀ S K) = I, K Kᵀ = Ŝ⁻¹, for the hierarchical structure.

    In the order (I2, I3, I1) the structure is block lower-triangular with a diagonal
    first block; S = Lᵀ W L with L = K⁻¹ of that form and W = I except off the diagonal
    of the I2 block, built from the last block backwards with Cholesky factors.
    Checks the fixed-point equation and the pattern of K, returns Lᵀ L."""
    dim = s.shape[0]
    i1, i2, i3 = _hierarchical_sets(dim, k1, k2)
    if len(i2) < 2:  # M = pattern ∪ patternᵀ covers every entry: Ŝ = S
        return s
    order = torch.tensor(i2 + i3 + i1)
    sp = s[order][:, order]
    a, b = len(i2), len(i2) + len(i3)  # block ends in the new order
    L = torch.zeros_like(sp)

    def upper_root(m):  # R with Rᵀ R = m
        return torch.linalg.cholesky(m).T

    L[b:, b:] = upper_root(sp[b:, b:])
    L[b:, :b] = torch.linalg.solve(L[b:, b:].T, sp[b:, :b])
    if b > a:
        schur = sp[a:b, a:b] - L[b:, a:b].T @ L[b:, a:b]
        L[a:b, a:b] = upper_root(schur)
        L[a:b, :a] = torch.linalg.solve(L[a:b, a:b].T, sp[a:b, :a] - L[b:, a:b].T @ L[b:, :a])
    rest = sp[:a, :a] - L[a:b, :a].T @ L[a:b, :a] - L[b:, :a].T @ L[b:, :a]
    L[:a, :a] = torch.diag(rest.diagonal().sqrt())
    back = torch.argsort(order)
    L = L[back][:, back]
    K = torch.linalg.inv(L)
    pattern = _hierarchical_pattern(dim, k1, k2)
    assert float(K.masked_fill(pattern, 0.0).abs().max()) <= 1e-12 * float(K.abs().max())
    X = K.T @ s @ K
    proj = torch.where(pattern.T, X, 2 * X) * pattern  # Π̂ (structures module)
    eye = torch.eye(dim, dtype=s.dtype)
    assert float((proj - eye).abs().max()) <= 1e-10
    return L.T @ L


@pytest.mark.parametrize(
    ("model_name", "k1", "k2"), [("mlp_tanh", 2, 1), ("mlp_tanh", 0, 2), ("conv1d", 2, 2)]
)
def test_singd_hierarchical_one_batch_against_dense(model_name, k1, k2):
    prob, capt, ref = _setup(model_name, "ce-mean", "exact")
    curv = SINGDCurvature(capt, Hierarchical(k1=k1, k2=k2))
    parts = []
    for rec in ref.records:
        A, G = R.kfac_factors(rec, ref.scale)
        assert A.shape[0] > k1 + k2 + 1  # a middle block with off-diagonal entries
        parts.append((A, G, rec))

    def completed(m: torch.Tensor, lam: float) -> torch.Tensor:
        """B(λ) = Ŝ(λ) − λI; at λ = 0 the fixed point of the undamped factor."""
        eye = torch.eye(m.shape[0], dtype=m.dtype)
        return _ikfac_fixed_point(m + lam * eye, k1, k2) - lam * eye

    D = torch.block_diag(
        *[R.wb_to_flat(torch.kron(completed(G, 0), completed(A, 0)), rec) for A, G, rec in parts]
    )

    def damped_matrix(lam):
        blocks = []
        for A, G, rec in parts:
            eye_a = torch.eye(A.shape[0], dtype=A.dtype)
            eye_g = torch.eye(G.shape[0], dtype=G.dtype)
            x = completed(G, lam) + lam * eye_g
            y = completed(A, lam) + lam * eye_a
            blocks.append(R.wb_to_flat(torch.kron(x, y), rec))
        return torch.block_diag(*blocks)

    errs = R.interface_errors(curv, D, DAMPINGS, damped=damped_matrix)
    eye = torch.eye(prob.P, dtype=torch.float64)
    for lam in DAMPINGS:
        expect = torch.linalg.matrix_norm(damped_matrix(lam) - D - lam * eye)
        errs[f"damping_excess(λ={lam:g})"] = R.rel_err(curv.damping_excess(lam), expect)
    R.assert_close_all(errs, RTOL, f"SINGD hierarchical {prob}")
    # the middle block is not the input factor's own: the structure changes the matrix
    assert R.rel_err(D, R.dense_kfac(ref.records, ref.scale)) > 1e-3


def test_singd_hierarchical_solve_with_dead_inputs():
    """A dead ReLU unit gives A a zero row and column (singular corners at λ = 0): the
    damped solve still equals the dense fixed point."""
    prob, capt, ref = _setup("mlp_mixed_bias", "ce-mean", "exact")
    curv = SINGDCurvature(capt, Hierarchical(k1=1, k2=2))
    v = R.random_vector(prob.P, seed=4)
    for lam in DAMPINGS:
        blocks = []
        for rec in ref.records:
            A, G = R.kfac_factors(rec, ref.scale)
            eye_a = torch.eye(A.shape[0], dtype=A.dtype)
            eye_g = torch.eye(G.shape[0], dtype=G.dtype)
            x = _ikfac_fixed_point(G + lam * eye_g, 1, 2)
            y = _ikfac_fixed_point(A + lam * eye_a, 1, 2)
            blocks.append(R.wb_to_flat(torch.kron(x, y), rec))
        expect = torch.linalg.solve(torch.block_diag(*blocks), v)
        assert R.rel_err(curv.solve(v, lam), expect) <= RTOL


def test_singd_hierarchical_in_compare():
    """The registered method runs through the metrics compare needs (default k1 = k2 = 15
    makes the small test layers dense: the matrix is KFAC's)."""
    prob = get_problem("mlp_tanh", "ce-mean")
    analysis = curvlab.compare.Analysis(prob.model, prob.loss_fn, prob.X, prob.y)
    hier = curvlab.compare.relative_errors(analysis, "singd-hierarchical")
    kfac = curvlab.compare.relative_errors(analysis, "kfac")
    for layer in analysis.layer_names:
        assert abs(hier[layer][0] - kfac[layer][0]) <= 1e-10


def test_singd_refuses_other_structures():
    from curvlab.optim.structures import Structure

    class Lower(Structure):
        name = "lower"
        _project = _dense = _mm = _tmm = _rmm = _compose = _trace = None

    prob = get_problem("mlp_tanh", "ce-mean")
    with pytest.raises(ValueError, match="knows the dense, diagonal, block_diagonal and"):
        SINGDCurvature(prob.capture("exact"), Lower())
