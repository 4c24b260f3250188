"""Oracle: `LBFGS` over a `TensorSpace` follows `torch.optim.LBFGS(max_iter=1)`.

The problem is deterministic and full batch: multinomial logistic regression
on the 1797 sklearn digits (pixels scaled to [0, 1]), mean cross-entropy.
torch's optimizer steps the model's parameters; ours moves a flat vector that
is loaded into a second, identical model for every evaluation. Small hand-made
objectives reach the line-search rules the digits runs do not (sufficient
decrease deciding, running out of evaluations, a bracket below tolerance).
Then convergence reasons, vector bookkeeping and operation counts.
"""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from distbelief.algorithms.sandblaster.lbfgs import LBFGS, LBFGSSettings, _cubic_minimum
from distbelief.algorithms.sandblaster.vector_space import TensorSpace
from distbelief.errors import UserError

ITERATIONS = 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problem is small: extra threads only add overhead (and contention on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(data.target, dtype=torch.long)


def make_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 10)


def torch_run(digits, settings: LBFGSSettings) -> tuple[list[float], list[int]]:
    """Loss after each of ITERATIONS torch steps, and the evaluations each step used."""
    x, y = digits
    model = make_model()
    line_search = None if settings.line_search == "none" else settings.line_search
    # With max_iter=1, torch gives the line search max_eval - 1 as its max_ls, i.e.
    # at most max_eval evaluations: so max_eval is our max_line_search.
    opt = torch.optim.LBFGS(model.parameters(), lr=settings.lr, max_iter=1,
                            max_eval=settings.max_line_search, history_size=settings.history,
                            line_search_fn=line_search, tolerance_grad=settings.tolerance_grad,
                            tolerance_change=settings.tolerance_change)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses, evals = [], []
    for _ in range(ITERATIONS):
        before = opt.state[model.weight].get("func_evals", 0)
        opt.step(closure)
        evals.append(opt.state[model.weight]["func_evals"] - before)
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x), y).item())
    return losses, evals


def _counted(op):
    def counted(self, *args):
        self.ops += 1
        return op(self, *args)
    return counted


class CountingSpace(TensorSpace):
    """A TensorSpace that records live handles and counts vector operations."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.live: set[int] = set()
        self.peak = 0
        self.ops = 0

    def new(self) -> int:
        v = super().new()
        self.live.add(v)
        self.peak = max(self.peak, len(self.live))
        return v

    def free(self, v: int) -> None:
        self.live.remove(v)
        super().free(v)

    copy = _counted(TensorSpace.copy)
    scale = _counted(TensorSpace.scale)
    axpy = _counted(TensorSpace.axpy)
    dot = _counted(TensorSpace.dot)
    norm_inf = _counted(TensorSpace.norm_inf)
    norm_1 = _counted(TensorSpace.norm_1)


def flat_setup(digits):
    """(space, x, evaluate) for the digits problem through a flat parameter vector."""
    x_data, y_data = digits
    model = make_model()
    params = list(model.parameters())
    space = CountingSpace(sum(p.numel() for p in params))
    x = space.new()
    space.tensor(x).copy_(torch.nn.utils.parameters_to_vector(params).detach())

    def evaluate(g: int) -> float:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(space.tensor(x), params)
        model.zero_grad()
        loss = F.cross_entropy(model(x_data), y_data)
        loss.backward()
        space.tensor(g).copy_(torch.cat([p.grad.reshape(-1) for p in params]))
        return loss.item()

    return space, x, evaluate


def our_run(digits, settings: LBFGSSettings) -> tuple[list[float], list[int]]:
    space, x, evaluate = flat_setup(digits)
    losses, evals = [], []
    with LBFGS(space, x, evaluate, settings) as opt:
        for _ in range(ITERATIONS):
            it = opt.step()
            losses.append(it.loss)
            evals.append(it.evaluations)
    return losses, evals


# The digits runs with lr = 1 accept every first trial step; larger and smaller lr
# and a small evaluation budget reach the rest of the line search (checked by
# tracing which lines run): lr 5 brackets on a positive slope, lr 100 zooms with
# the insufficient-progress rule, and max_line_search 2 runs out of evaluations.
SETTINGS = {
    "none": LBFGSSettings(lr=1.0),
    "none-history3": LBFGSSettings(lr=1.0, history=3),
    "wolfe": LBFGSSettings(line_search="strong_wolfe"),
    "wolfe-history3": LBFGSSettings(line_search="strong_wolfe", history=3),
    "wolfe-lr5": LBFGSSettings(line_search="strong_wolfe", lr=5.0),
    "wolfe-lr100-history3": LBFGSSettings(line_search="strong_wolfe", lr=100.0, history=3),
    "wolfe-lr0.01-budget2": LBFGSSettings(line_search="strong_wolfe", lr=0.01, max_line_search=2),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_follows_torch_lbfgs_on_digits(digits, name):
    settings = SETTINGS[name]
    want, torch_evals = torch_run(digits, settings)
    got, evals = our_run(digits, settings)
    rel = [abs(a - b) / abs(b) for a, b in zip(got, want)]
    assert max(rel) < 1e-5, f"relative loss differences per iteration: {rel}"
    assert want[-1] < 0.5 * want[0]  # the run really optimised
    if settings.line_search == "none":
        assert evals == [2] + [1] * (ITERATIONS - 1)  # the first call also evaluates the start
        assert torch_evals == [1] * ITERATIONS
    else:
        # torch re-evaluates at the start of each step the point its search just
        # accepted; we keep that evaluation's result, so each step uses one fewer
        assert evals[0] == torch_evals[0]
        assert evals[1:] == [e - 1 for e in torch_evals[1:]]
        assert max(evals) <= settings.max_line_search + 1


def softplus_mix(v: torch.Tensor) -> torch.Tensor:
    """Smooth and not quadratic; some of its searches stop on a tiny bracket."""
    terms = torch.stack([3 * v.sum(), -4 * v[0], 2 * v[1:].sum()])
    return torch.logsumexp(terms, 0) + 0.1 * (v**2).sum()


def shelf(v: torch.Tensor) -> torch.Tensor:
    """Slope -1 everywhere, but at x = 1 only 5e-4 below f(0): sufficient decrease decides."""
    u = v.clamp(0, 1)
    return (-v + 0.9995 * (3 * u**2 - 2 * u**3)).sum()


def wall(v: torch.Tensor) -> torch.Tensor:
    """Slope -1 up to x = 1, then a steep wall: the search extrapolates into it."""
    return (-v + 50 * torch.relu(v - 1) ** 2).sum()


def autograd_setup(objective, x0: torch.Tensor):
    """(space, x, evaluate) for a function of one vector, differentiated by autograd."""
    space = TensorSpace(len(x0))
    x = space.new()
    space.tensor(x).copy_(x0)

    def evaluate(g: int) -> float:
        v = space.tensor(x).clone().requires_grad_()
        loss = objective(v)
        loss.backward()
        space.tensor(g).copy_(v.grad)
        return loss.item()

    return space, x, evaluate


# (objective, start, settings, iterations)
SMALL_PROBLEMS = {
    "softplus-mix": (softplus_mix, torch.randn(6, generator=torch.Generator().manual_seed(1)) * 2,
                     LBFGSSettings(line_search="strong_wolfe", history=3), 30),
    "shelf": (shelf, torch.zeros(1), LBFGSSettings(line_search="strong_wolfe"), 3),
    # out of evaluations after the wall: the start is better than the last trial
    "wall-budget2": (wall, torch.zeros(1), LBFGSSettings(line_search="strong_wolfe", max_line_search=2), 3),
}


@pytest.mark.parametrize("name", SMALL_PROBLEMS)
def test_follows_torch_lbfgs_on_small_objectives(name):
    objective, x0, settings, iterations = SMALL_PROBLEMS[name]
    p = torch.nn.Parameter(x0.clone())
    reference = torch.optim.LBFGS([p], lr=settings.lr, max_iter=1, max_eval=settings.max_line_search,
                                  history_size=settings.history, line_search_fn="strong_wolfe")

    def closure():
        reference.zero_grad()
        loss = objective(p)
        loss.backward()
        return loss

    space, x, evaluate = autograd_setup(objective, x0)
    with LBFGS(space, x, evaluate, settings) as opt:
        for _ in range(iterations):
            before = reference.state[p].get("func_evals", 0)
            reference.step(closure)
            it = opt.step()
            # torch keeps going after a stop, and so do we
            assert torch.equal(space.tensor(x), p.detach())
            # after its first step, torch spends one more: it re-evaluates where it stands
            resumed = 1 if before > 0 else 0
            assert it.evaluations == reference.state[p]["func_evals"] - before - resumed


def test_a_search_out_of_evaluations_falls_back_to_the_start():
    objective, x0, settings, _ = SMALL_PROBLEMS["wall-budget2"]
    space, x, evaluate = autograd_setup(objective, x0)
    with LBFGS(space, x, evaluate, settings) as opt:
        it = opt.step()
        assert (it.step, it.converged, it.evaluations) == (0.0, "step", 3)
        assert space.tensor(x).item() == 0.0 and it.loss == 0.0


def quadratic(space: TensorSpace, x: int, scales: torch.Tensor):
    """f(x) = 1/2 sum scales_i x_i^2, gradient scales * x; counts its calls."""
    calls = []

    def evaluate(g: int) -> float:
        v = space.tensor(x)
        space.tensor(g).copy_(scales * v)
        calls.append(1)
        return float(0.5 * (scales * v * v).sum())

    return evaluate, calls


@pytest.mark.parametrize("line_search", ["none", "strong_wolfe"])
def test_converges_on_a_quadratic(line_search):
    n = 20
    space = TensorSpace(n, dtype=torch.float64)
    x = space.new()
    space.tensor(x).copy_(torch.linspace(-1, 1, n, dtype=torch.float64))
    evaluate, calls = quadratic(space, x, torch.logspace(0, 1, n, dtype=torch.float64))
    opt = LBFGS(space, x, evaluate, LBFGSSettings(line_search=line_search, tolerance_grad=1e-8))
    its = []
    while not its or its[-1].converged is None:
        its.append(opt.step())
        assert len(its) < 200
    assert space.tensor(x).abs().max() < 1e-3
    assert opt.loss == its[-1].loss < 1e-6
    assert sum(it.evaluations for it in its) == len(calls)
    opt.close()


def test_zero_gradient_start_is_converged_without_moving():
    space = TensorSpace(5)
    x = space.new()
    space.tensor(x).zero_()  # the minimum of the quadratic
    evaluate, calls = quadratic(space, x, torch.ones(5))
    opt = LBFGS(space, x, evaluate, LBFGSSettings())
    assert opt.loss is None
    first, second = opt.step(), opt.step()
    assert (first.converged, first.evaluations, first.step) == ("gradient", 1, 0.0)
    assert (second.converged, second.evaluations) == ("gradient", 0)
    assert len(calls) == 1 and opt.loss == 0.0
    assert torch.equal(space.tensor(x), torch.zeros(5))


def test_a_non_descent_direction_stops_without_moving():
    # tolerance_change above |g|^2: the first direction -g is "too flat" to follow
    space = TensorSpace(3)
    x = space.new()
    space.tensor(x).fill_(1e-3)
    evaluate, calls = quadratic(space, x, torch.ones(3))
    opt = LBFGS(space, x, evaluate, LBFGSSettings(tolerance_change=1e-3, tolerance_grad=0.0))
    it = opt.step()
    assert (it.converged, it.step, it.evaluations) == ("direction", 0.0, 1)
    assert torch.equal(space.tensor(x), torch.full((3,), 1e-3))
    assert opt.step().converged == "direction" and len(calls) == 1


def test_reports_a_vanishing_step():
    space = TensorSpace(3, dtype=torch.float64)
    x = space.new()
    space.tensor(x).fill_(1.0)
    evaluate, _ = quadratic(space, x, torch.ones(3, dtype=torch.float64))
    opt = LBFGS(space, x, evaluate, LBFGSSettings(lr=1e-12))
    it = opt.step()
    assert it.converged == "step" and 0 < it.step <= 1e-12


@pytest.mark.parametrize("line_search, lr", [("none", 1.0), ("strong_wolfe", 100.0)])
def test_close_frees_every_vector_and_memory_stays_bounded(digits, line_search, lr):
    space, x, evaluate = flat_setup(digits)
    history = 3
    settings = LBFGSSettings(line_search=line_search, lr=lr, history=history)
    with LBFGS(space, x, evaluate, settings) as opt:
        for _ in range(25):  # the ring of 3 pairs wraps several times
            assert opt.step().converged is None
    assert space.live == {x}
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()
    # 2 per pair, plus g, the new s and y before the oldest pair goes, d; the line
    # search adds x_init and up to 3 trial gradients (2 bracket ends and the new one)
    assert 2 * history < space.peak - 1 <= 2 * history + 6


@pytest.mark.parametrize("line_search", ["none", "strong_wolfe"])
def test_uses_the_expected_number_of_vector_operations(digits, line_search):
    # every operation is a round trip to the shards: count them for one iteration
    # with a full ring (here the line search accepts its first trial)
    space, x, evaluate = flat_setup(digits)
    history = 3
    with LBFGS(space, x, evaluate, LBFGSSettings(history=history, line_search=line_search)) as opt:
        for _ in range(10):
            opt.step()
        before = space.ops
        assert opt.step().evaluations == 1
        used = space.ops - before
    # norm_inf g; s and y (3); y.s, y.y; copy g, 4 per pair, scale by H_diag; g.d; norm_inf d
    direction = 1 + 3 + 2 + (1 + 4 * history + 1) + 1 + 1
    if line_search == "none":
        assert used == direction + 1  # x += t d
    else:
        assert used == direction + 3  # keep x_init, x += t d, g_new.d


def test_cubic_minimum():
    def slope(v):  # derivatives are 0-dim tensors, as they come from dot products
        return torch.tensor(v, dtype=torch.float64)

    # f = (x - 1)^2 sampled at 0 and 3: the cubic through it is the parabola itself
    assert float(_cubic_minimum(0.0, 1.0, slope(-2.0), 3.0, 4.0, slope(4.0))) == pytest.approx(1.0)
    assert float(_cubic_minimum(3.0, 4.0, slope(4.0), 0.0, 1.0, slope(-2.0))) == pytest.approx(1.0)
    # clamped to the bounds
    assert float(_cubic_minimum(0.0, 1.0, slope(-2.0), 3.0, 4.0, slope(4.0), bounds=(2.0, 5.0))) == 2.0
    # f = x^3 - 3x on [0, 2]: the local minimum at 1
    assert float(_cubic_minimum(0.0, 0.0, slope(-3.0), 2.0, 2.0, slope(9.0))) == pytest.approx(1.0)
    # no real minimiser (d1^2 < g1 g2): the middle of the bounds
    assert float(_cubic_minimum(0.0, 0.0, slope(2.0), 1.0, 1.0, slope(2.0))) == 0.5


def test_rejects_bad_settings():
    with pytest.raises(UserError, match="line_search"):
        LBFGSSettings(line_search="armijo")
    with pytest.raises(UserError, match="history"):
        LBFGSSettings(history=0)
    with pytest.raises(UserError, match="max_line_search"):
        LBFGSSettings(max_line_search=0)
