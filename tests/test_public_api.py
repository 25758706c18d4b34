"""The package's public API: every exported name resolves, ``import cheers`` is cheap, and it ships typed."""

import subprocess
import sys
from pathlib import Path

import cheers


def test_every_exported_name_resolves_to_its_definition():
    for name in cheers.__all__:
        value = getattr(cheers, name)
        if name != "__version__":
            assert getattr(value, "__module__", "").startswith("cheers"), name
    assert set(cheers._EXPORTS) <= set(dir(cheers))


def test_unknown_names_raise_attribute_error():
    try:
        cheers.NotAThing  # noqa: B018
    except AttributeError as err:
        assert "NotAThing" in str(err)
    else:  # pragma: no cover
        raise AssertionError("cheers.NotAThing resolved")


def test_import_cheers_does_not_import_torch():
    code = "import sys, cheers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_building_the_command_line_does_not_import_torch():
    """``cheers --help`` stays fast: the choices come from cheers.choices, the heavy modules load on use."""
    from cheers import quantization, sampling
    from cheers.choices import QUANTIZATIONS, SOLVERS

    # the names offered are the ones implemented
    assert tuple(quantization._SCHEMES) == QUANTIZATIONS and set(sampling.EVALS_PER_STEP) == set(SOLVERS)
    code = "import sys, cheers.cli; cheers.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_package_is_marked_typed():
    assert (Path(cheers.__file__).parent / "py.typed").is_file()
