"""The import graph of acmix_mm.ops: exactly the intended edges, and no cycle.

Read from the sources with ``ast``, so imports inside functions (the dispatcher's lazy import
of the Triton module) count as edges too. A new module or import in ops must be added to
EXPECTED here: that is the point, the graph is a design decision.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, Set

import acmix_mm.ops

OPS_DIR = os.path.dirname(os.path.abspath(acmix_mm.ops.__file__))
PACKAGE = 'acmix_mm.ops'

# module -> the ops modules it imports ('__init__' is the package itself).
EXPECTED: Dict[str, Set[str]] = {
    '__init__': {'acmix', 'conv_layer'},
    'acmix': {'cpp_fused', 'cpp_shift', 'local_attention', 'replaced_conv'},
    'conv_layer': {'acmix'},
    'cpp_attention': {'cpp_extension', 'window'},
    'cpp_extension': set(),
    'cpp_fused': {'cpp_extension'},
    'cpp_shift': {'cpp_extension', 'local_attention'},
    'lean_attention': {'window'},
    'local_attention': {'cpp_attention', 'cpp_extension', 'lean_attention',
                        'triton_local_attention', 'window'},
    'replaced_conv': set(),
    'triton_kernels': set(),
    'triton_local_attention': {'triton_kernels', 'window'},
    'window': set(),
}
KERNELS = ('lean_attention', 'cpp_attention', 'cpp_fused', 'triton_local_attention', 'triton_kernels')


def _modules() -> Set[str]:
    return {name[:-3] for name in os.listdir(OPS_DIR) if name.endswith('.py')}


def _ops_imports(module: str, modules: Set[str]) -> Set[str]:
    """The ops modules that ``module``'s source imports anywhere (top level or in functions)."""
    with open(os.path.join(OPS_DIR, module + '.py'), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = PACKAGE + ('.' + node.module if node.module else '')
            elif node.level == 0 and node.module:
                base = node.module
            else:  # '..' and above: outside ops
                continue
            # 'from . import x' imports submodule x; 'from .x import y' imports module x.
            targets = [base] + [f'{base}.{alias.name}' for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith(PACKAGE + '.'):
                name = target[len(PACKAGE) + 1:].split('.')[0]
                if name in modules:
                    found.add(name)
            elif target == PACKAGE and isinstance(node, ast.Import):
                found.add('__init__')
    found.discard(module)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {module: _ops_imports(module, modules) for module in sorted(modules)}


def test_edges_are_the_intended_ones():
    assert _graph() == EXPECTED


def test_graph_is_acyclic():
    graph = _graph()
    # Kahn's algorithm: repeatedly drop modules that import nothing left; a cycle remains.
    remaining = {module: set(deps) for module, deps in graph.items()}
    order = []
    while remaining:
        leaves = sorted(m for m, deps in remaining.items() if not deps)
        assert leaves, f'import cycle among {sorted(remaining)}: {remaining}'
        order.extend(leaves)
        for module in leaves:
            del remaining[module]
        for deps in remaining.values():
            deps.difference_update(leaves)
    assert order[-1] == '__init__' and set(order) == set(graph)


def test_window_and_kernels_do_not_import_the_dispatcher():
    graph = _graph()
    assert graph['window'] == set()
    for kernel in KERNELS:
        assert 'local_attention' not in graph[kernel], kernel
        assert 'acmix' not in graph[kernel], kernel
