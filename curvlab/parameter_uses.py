"""Each captured parameter must reach the loss only through the calls of modules that
own it.

Capture computes a layer's gradient from what its modules saw (their inputs and the
gradients at their outputs, for every call).  A parameter that also enters the
computation elsewhere — ``F.linear(h, self.enc.weight)`` outside any module, a weight
that feeds its own module's input — has gradient contributions that capture never sees,
so ``Capture.grad`` and every Fisher built from it would be silently wrong.
:class:`ForwardWatch` records, for every call of each captured module during the
capture's forward pass, the autograd nodes of its inputs, of its output and the size of
its input's batch dimension; :meth:`ForwardWatch.check` then walks the autograd graph
once:

* a call's *region* is everything reachable from its output node without passing its
  input nodes (its own computation, parametrisations of its weights included);
* every node of a region except the output must be consumed only inside that region,
  except a parameter's leaf, which may be consumed inside the region of any call of any
  module that owns the parameter (tied weights, a module called twice: capture reads
  them all, :class:`~curvlab.layers.shared.SharedKind`); every owned parameter that
  reaches the loss must lie in one of its modules' regions.

Any other use of a parameter (or of a parametrised weight computed once and reused
outside its call) is refused, naming the parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from curvlab.errors import UnsupportedModelError
from curvlab.independence import check_batch_first
from curvlab.layers import ModuleKind


class ForwardWatch:
    """Hooks on the captured modules that note, per call, their input and output graph
    nodes and the leading dimension of their input, and which modules receive inputs
    with the batch size also in another dimension (``ambiguous``: only a probe with
    another batch size tells those apart).

    Use as a context manager around the capture's forward pass.  Hooks run before any
    other hook of the module (``prepend``), so they see the module's own output.

    Args:
        modules: The captured modules' kinds (``name``, ``module``, ``params``).
    """

    def __init__(self, modules: Sequence[ModuleKind]):
        self.modules = list(modules)
        self.inputs: dict[str, list[set[object]]] = {m.name: [] for m in self.modules}
        self.outputs: dict[str, list[object]] = {m.name: [] for m in self.modules}
        self.leading: dict[str, list[int]] = {}
        self.ambiguous: list[ModuleKind] = []
        self._handles: list = []

    def __enter__(self) -> ForwardWatch:
        for info in self.modules:
            module = info.module
            self._handles.append(
                module.register_forward_pre_hook(self._before(info), prepend=True, with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._after(info), prepend=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _before(self, info: ModuleKind):
        name = info.name

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            xs = info.inputs(args, kwargs)
            self.inputs[name].append({x.grad_fn for x in xs if x.grad_fn is not None})
            d = info.batch_dim
            self.leading.setdefault(name, []).append(xs[0].shape[d] if xs[0].dim() > d else 0)
            if info not in self.ambiguous and any(_batch_size_repeats(x, d) for x in xs):
                self.ambiguous.append(info)

        return hook

    def _after(self, info: ModuleKind):
        name = info.name

        def hook(module: nn.Module, args: tuple, out: object) -> None:
            self.outputs[name].append(info.output(out).grad_fn)

        return hook

    def check(self, model: nn.Module, output: Tensor, batch_size: int) -> None:
        """Refuse layer inputs that are not batch-first and parameters used outside
        the calls of their modules (module docstring).

        Args:
            model: The network (for parameter names).
            output: The model output, still attached to its autograd graph.
            batch_size: ``N``.
        """
        check_batch_first(self.leading, batch_size)
        if output.grad_fn is None:
            return
        consumers = _consumers(output.grad_fn)
        used = {id(node.variable) for node in consumers if _is_leaf(node)}
        names = {id(p): name for name, p in model.named_parameters()}
        regions: list[tuple[ModuleKind, object, set[object]]] = []
        calls_of: dict[int, set[int]] = {}  # parameter id -> the calls of its modules
        where: dict[object, set[int]] = {}  # node -> the calls whose region holds it
        for info in self.modules:
            for head, stop in zip(self.outputs[info.name], self.inputs[info.name]):
                if head is None:
                    continue
                k = len(regions)
                region = _region(head, stop, {id(p) for p in info.params})
                regions.append((info, head, region))
                for p in info.params:
                    calls_of.setdefault(id(p), set()).add(k)
                for node in region:
                    where.setdefault(node, set()).add(k)
        inside: set[int] = set()
        for info, head, region in regions:
            for node in region:
                if node is head:
                    continue
                if _is_leaf(node):
                    home = calls_of[id(node.variable)]
                    if all(where.get(c, set()) & home for c in consumers.get(node, ())):
                        continue
                    what = f"parameter '{names.get(id(node.variable), '?')}'"
                elif all(c in region for c in consumers.get(node, ())):
                    continue
                else:
                    what = f"a weight computed in module '{info.name}'"
                raise UnsupportedModelError(_message(what, info.name))
            inside.update(id(node.variable) for node in region if _is_leaf(node))
        for info in self.modules:
            for p in info.params:
                if id(p) not in inside and id(p) in used:
                    raise UnsupportedModelError(_message(f"parameter '{names[id(p)]}'", info.name))


def _message(what: str, module: str) -> str:
    return (
        f"{what} is also used outside module '{module}' and the other modules that own it "
        "(e.g. F.linear(h, module.weight) elsewhere, or a weight feeding the module's own "
        "input); the capture sees only the modules' own calls, so its gradient would be "
        "wrong. Route every use through a module that owns the parameter (tied weights "
        "shared between modules are read exactly), or untie the weights."
    )


def _is_leaf(node: object) -> bool:
    return type(node).__name__ == "AccumulateGrad"


def _consumers(root: object) -> dict[object, list[object]]:
    """Every node reachable from ``root`` -> the nodes that take its output."""
    consumers: dict[object, list[object]] = {root: []}
    stack = [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in consumers:
                consumers[child] = []
                stack.append(child)
            consumers[child].append(node)
    return consumers


def _batch_size_repeats(x: Tensor, d: int) -> bool:
    """Whether the size of ``x``'s batch dimension ``d`` is also that of another one."""
    shape = list(x.shape)
    return x.dim() > d and shape.pop(d) in shape


def _region(head: object, stop: set[object], own: set[int]) -> set[object]:
    """Nodes reachable from ``head`` without passing ``stop`` (the call's inputs) or
    entering a leaf that is not one of the module's parameters (ids ``own``)."""
    region = {head}
    stack = [head]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None or child in stop or child in region:
                continue
            if _is_leaf(child) and id(child.variable) not in own:
                continue
            region.add(child)
            stack.append(child)
    return region
