"""Each captured parameter must reach the loss only through its own module's output.

Capture computes a layer's gradient from what the layer saw (its inputs and the
gradient at its output).  A parameter that also enters the computation elsewhere — a
tied decoder ``F.linear(h, self.enc.weight)``, a weight read by another module — has
gradient contributions that capture never sees, so ``Capture.grad`` and every Fisher
built from it would be silently wrong.  :class:`ForwardWatch` records, for each
captured module during the capture's forward pass, the autograd nodes of its inputs, of
its output and the size of its input's batch dimension; :meth:`ForwardWatch.check` then
walks the autograd graph once:

* the module's *region* is everything reachable from its output node without passing
  its input nodes (its own computation, parametrisations of its weights included);
* every node of the region except the output must be consumed only inside the region,
  and the module's trainable parameters must lie in it.

A parameter (or a parametrised weight computed once and reused) that is also consumed
outside its module violates this and is refused, naming the parameter.  A module
called twice per forward is refused by capture's own hook.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from curvlab.errors import UnsupportedModelError
from curvlab.independence import check_batch_first
from curvlab.layers import LayerKind


class ForwardWatch:
    """Hooks on the captured modules that note their input and output graph nodes, the
    leading dimension of their input and which inputs have the batch size also in another
    dimension (``ambiguous``: only a probe with another batch size tells those apart).

    Use as a context manager around the capture's forward pass.  Hooks run before any
    other hook of the module (``prepend``), so they see the module's own output.

    Args:
        layers: The captured layers' kinds (``name``, ``module``, ``params``).
    """

    def __init__(self, layers: Sequence[LayerKind]):
        self.layers = list(layers)
        self.inputs: dict[str, set[object]] = {}
        self.outputs: dict[str, object] = {}
        self.leading: dict[str, int] = {}
        self.ambiguous: list[LayerKind] = []
        self._handles: list = []

    def __enter__(self) -> ForwardWatch:
        for info in self.layers:
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

    def _before(self, info: LayerKind):
        name = info.name

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in self.inputs:
                return
            xs = info.inputs(args, kwargs)
            self.inputs[name] = {x.grad_fn for x in xs if x.grad_fn is not None}
            d = info.batch_dim
            self.leading[name] = xs[0].shape[d] if xs[0].dim() > d else 0
            if any(_batch_size_repeats(x, d) for x in xs):
                self.ambiguous.append(info)

        return hook

    def _after(self, info: LayerKind):
        name = info.name

        def hook(module: nn.Module, args: tuple, out: object) -> None:
            if name not in self.outputs:
                self.outputs[name] = info.output(out).grad_fn

        return hook

    def check(self, model: nn.Module, output: Tensor, batch_size: int) -> None:
        """Refuse layer inputs that are not batch-first and parameters used outside
        their module (module docstring).

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
        for info in self.layers:
            name = info.name
            head = self.outputs.get(name)
            if head is None:
                continue
            own = {id(p) for p in info.params}
            region = _region(head, self.inputs.get(name, set()), own)
            for node in region:
                if node is head or all(c in region for c in consumers.get(node, ())):
                    continue
                what = (
                    f"parameter '{names.get(id(node.variable), '?')}'"
                    if _is_leaf(node)
                    else f"a weight computed in module '{name}'"
                )
                raise UnsupportedModelError(_message(what, name))
            inside = {id(node.variable) for node in region if _is_leaf(node)}
            for p_id in own - inside:
                if p_id in used:
                    raise UnsupportedModelError(_message(f"parameter '{names[p_id]}'", name))


def _message(what: str, module: str) -> str:
    return (
        f"{what} is also used outside module '{module}' (e.g. a tied weight or "
        f"F.linear(h, module.weight) elsewhere); the capture sees only the module's own "
        "use, so its gradient would be wrong. Untie the weights (give the second use its "
        "own parameter) or route every use through the module."
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
    """Nodes reachable from ``head`` without passing ``stop`` (the module's inputs) or
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
