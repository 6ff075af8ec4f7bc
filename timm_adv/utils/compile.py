"""``--torchcompile``: the flags' check, and the count of graphs dynamo compiled (recompiles show as growth)."""
from typing import Optional

__all__ = ['check_compile_args', 'compiled_graphs']


def check_compile_args(backend: Optional[str], mode: Optional[str]) -> None:
    """Raises ValueError naming the flag for an unknown ``--torchcompile`` backend or a lone ``--torchcompile-mode``.

    Example:
        >>> check_compile_args('aot_eager', None)
        >>> check_compile_args(None, 'max-autotune')
        ValueError: --torchcompile-mode max-autotune does nothing without --torchcompile; ...
    """
    if mode and not backend:
        raise ValueError(f'--torchcompile-mode {mode} does nothing without --torchcompile; add --torchcompile '
                         f'(inductor) or --torchcompile BACKEND, or drop it.')
    if backend:
        import torch._dynamo  # imported only when compiling: it takes a while
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ValueError(f'--torchcompile {backend}: unknown torch.compile backend; choose one of '
                             f'{", ".join(sorted(known))}.')


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (every compile and recompile adds one).

    Example:
        >>> before = compiled_graphs()
        >>> task(x, y)['loss'].backward()   # a compiled task, after its warm-up steps
        >>> compiled_graphs() - before       # 0: nothing recompiled
        0
    """
    from torch._dynamo.utils import counters
    return int(counters['stats']['unique_graphs'])
