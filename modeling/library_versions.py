"""The transformers and timm versions that saved rskip folders are tested with, and the check that names them.

Saved folders carry this file: their code is imported by the user's transformers and timm, without rskip. Below the
oldest tested version that code would fail deep inside the library; `require_versions` fails first, with the fix.
`tests/test_compatibility.py` loads folders under the oldest versions and runs the Marian tests under the newest.
"""

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

# (oldest, newest) tested. Older versions lack what the code needs: transformers < 5.4 has no dataclass configs
# (`__post_init__`, typed fields); timm < 1.0.16 has no `ResNetV2.forward_intermediates` (hidden states).
TESTED_VERSIONS = {
    "transformers": ("5.4.0", "5.25.0"),
    "timm": ("1.0.16", "1.0.31"),
}


def tested_ranges(*libraries: str) -> dict[str, str]:
    """The tested range of each library, as pip requirements: `{"transformers": ">=5.4.0,<=5.25.0"}`."""
    return {library: ">={},<={}".format(*TESTED_VERSIONS[library]) for library in libraries}


def require_versions(*libraries: str) -> None:
    """Raise `ImportError` naming the installed version, the tested range and the pip command, if a library is older
    than the oldest tested version. Newer versions are allowed: they are untested, not known to break."""
    for library in libraries:
        try:  # the installed distribution's version, without importing the library (the configs need no timm)
            installed = version(library)
        except PackageNotFoundError:
            continue  # not installed: importing it, where it is needed, says so
        oldest, newest = TESTED_VERSIONS[library]
        if Version(installed) < Version(oldest):
            raise ImportError(
                f"this rskip model needs {library}>={oldest}, but {library} {installed} is installed (tested range: "
                f"{library} {oldest} to {newest}); upgrade with: pip install '{library}>={oldest}'"
            )


__all__ = ["TESTED_VERSIONS", "require_versions", "tested_ranges"]
