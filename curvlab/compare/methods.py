"""The methods a comparison can run: the compare view of :mod:`curvlab.methods`.

Every method turns the mini-batch gradient ``g`` into an update direction
``d(λ) = method.solve(g, λ)`` (:meth:`curvlab.Curvature.solve`, so each method keeps
its own damping rule).  :data:`METHODS` lists the registered methods that have a
curvature builder (a live view: methods added with
:func:`~curvlab.methods.register_method` appear in it).  Methods that share a
curvature matrix (``kfac`` and ``kfac-standard``) have the same :attr:`Method.matrix`,
so spectra and matrix errors are computed once for them.
"""

from curvlab.methods import DEFAULT_METHODS, METHODS, Method, check_methods, register_method

__all__ = ["DEFAULT_METHODS", "METHODS", "Method", "check_methods", "register_method"]
