"""Names that command lines offer as choices, in a module that imports nothing heavy.

Building a parser (``cheers --help``, ``cheers serve --help``) must not import torch; the modules that
implement these options (:mod:`cheers.sampling`, :mod:`cheers.quantization`) take their names from here.
"""

from __future__ import annotations

SOLVERS: tuple[str, ...] = ("euler", "multistep", "heun", "midpoint")
"""Flow ODE solvers (``"euler"``: the release's)."""

QUANTIZATIONS: tuple[str, ...] = ("int8", "float8", "int4")
"""Weight-only quantisation schemes (torchao)."""
