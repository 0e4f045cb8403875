"""Triton's interpreter (``TRITON_INTERPRET=1``), twice as fast on our kernels: two patches.

Without a GPU, the kernels run in Triton's interpreter: the tests on CPU tensors
(``tests/kernels``) and ``benchmarks/gpu_bench.py --dry-run``. The interpreter swaps
``triton.language``'s builtins for NumPy-backed ones when a launch starts and puts them back when
it ends (``_patch_lang``, one ``_LangPatchScope`` per launch). It also runs ``_patch_lang`` again
on **every call of a ``@triton.jit`` helper** inside the kernel, where the modules are already
swapped: ``inspect.getmembers`` over ``triton.language``, ``tl.tensor`` and ``tl.math``, 0.4 ms a
call (triton 3.9, this project's CPU box), thousands of calls per launch for kernels written as
ours are (``_key_tile``, ``_online_update``, ``_stream_tile`` …). cProfile of one forward launch
(``test_tile_paths_match_reference``'s shapes): 3.2 s of 9.2 s in that re-patching; without it
the same three launches take 6.5 s instead of 9.8 s and give bit-identical outputs.

:func:`patch_language_once` makes a helper's call skip ``_patch_lang`` when every language
module its globals hold is one the enclosing launch has swapped already. That second patching
only rebinds the same attributes to equivalent wrappers, which the launch's scope then restores
anyway, so skipping it changes nothing but the time; a helper that sees a module the launch did
not swap (``triton.language.core`` under its own name, say) is patched as before. Everything else
(the launch's own patching and restoring) is the interpreter's.

:func:`skip_discarded_overflow_checks`: for every ``+``, ``-`` and ``*`` of 32-bit integers the
interpreter builds an overflow check (``binary_op_sanitize_overflow_impl``: both operands cast to
int64, the operation again, two comparisons, an ``and``) and hands it to ``device_assert``, which
drops it unless the launch runs with ``debug`` on, which the interpreter's options never are
(``InterpreterOptions.debug`` is False and nothing sets it). A compiled kernel loses the same dead
code in its compiler; the interpreter computes it in NumPy every time: 2.4 s of a 5.4 s forward
launch (cProfile, ``test_tile_paths_match_reference``'s shapes). The patch skips building the
check exactly when it would be dropped (the interpreter's options say ``debug`` is off) and builds
it as before otherwise; six forward launches: 9.7 → 5.7 s, outputs bit-identical.

:func:`speed_up_interpreter` installs both. They rely on private names of
``triton.runtime.interpreter`` (``_patch_lang`` and ``_LangPatchScope``; ``interpreter_semantic``
and its ``binary_op_sanitize_overflow_impl``), the same in triton 3.6 (the lent GPU machines'
version) and 3.9; where one is missing, that patch leaves the interpreter alone and says so by
returning False. Nothing here runs for compiled kernels on a GPU.
"""

from __future__ import annotations

import functools
import inspect


def patch_language_once() -> bool:
    """Make helper calls inside an interpreted launch skip re-patching ``triton.language``
    (see the module docstring). Idempotent. True if installed (or already), False where this
    triton has no such interpreter internals (nothing changed then)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None:
        return False
    if getattr(original, "patches_once", False):
        return True
    swapped: list[frozenset] = []  # per launch in progress: ids of the modules its patching swapped

    @functools.lru_cache(maxsize=None)
    def language_modules(fn) -> frozenset:
        return frozenset(id(value) for value in fn.__globals__.values()
                         if inspect.ismodule(value) and value in (tl, tl.core))

    def patch_lang(fn):
        modules = language_modules(fn)
        if swapped and modules <= swapped[-1]:
            return scope_type()  # a helper inside a launch: its modules are swapped already
        scope = original(fn)
        if swapped:  # a helper that sees another module: patched as the interpreter does
            swapped[-1] = swapped[-1] | modules
            return scope
        # a launch (GridExecutor), which restores its scope when it ends: that also ends its record
        restore = scope.restore

        def restore_and_end() -> None:
            try:
                restore()
            finally:
                swapped.pop()

        scope.restore = restore_and_end
        swapped.append(modules)
        return scope

    patch_lang.patches_once = True
    interpreter._patch_lang = patch_lang
    return True


def skip_discarded_overflow_checks() -> bool:
    """Make the interpreter skip building the int32 overflow checks its ``device_assert`` would
    drop (``debug`` off; see the module docstring); with ``debug`` on they are built and asserted
    as before. Idempotent. True if installed (or already), False where this triton has no such
    interpreter internals (nothing changed then)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    semantic = getattr(interpreter, "interpreter_semantic", None)
    original = getattr(semantic, "binary_op_sanitize_overflow_impl", None)
    if original is None or not hasattr(semantic, "builder"):
        return False
    if getattr(original, "skips_discarded", False):
        return True

    @functools.wraps(original)
    def sanitize_overflow(*args, **kwargs):
        if not getattr(semantic.builder.options, "debug", True):
            return None  # device_assert would drop the check: nothing to build
        return original(*args, **kwargs)

    sanitize_overflow.skips_discarded = True
    semantic.binary_op_sanitize_overflow_impl = sanitize_overflow  # this instance only: the interpreter's
    return True


def speed_up_interpreter() -> dict[str, bool]:
    """Install both patches (:func:`patch_language_once`, :func:`skip_discarded_overflow_checks`);
    which of them this triton took."""
    return {"patch_language_once": patch_language_once(),
            "skip_discarded_overflow_checks": skip_discarded_overflow_checks()}
