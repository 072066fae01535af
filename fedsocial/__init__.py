"""fedsocial: privacy-preserving federated social recommendation.

The one installed top-level package. Its subpackages are the repository's top-level folders
(``fedsocial.shared``, ``fedsocial.client``, ``fedsocial.server``, ``fedsocial.simulations``), linked
here so that the source tree keeps the layout of DESIGN.md and the installed distribution exposes one
name only.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("fedsocial")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
