"""The command lines of ``ciae_core``: one thin module per console script.

Each module holds only what a command line needs — ``build_parser()`` (argparse), reading and
walking files, printing results, exit codes — and a ``main(argv=None) -> int`` that calls the
library (``ciae_core.train``, ``.evaluation``, ``.predictor``, ``.export``, ``.bench``,
``.synth``). Library modules keep no argparse and no ``main``; only this layer may import several
of them at once, which is what keeps the library free of import circles.
"""
