"""Firecracker VMM driver.

api (REST client over the API socket), bodies (request bodies), layout (where a VM's
files live), cmdline (Firecracker/jailer command lines, pure), staging (jail files and
their removal), waits (pid file, API socket), process (`FirecrackerProcess`), driver
(`FirecrackerDriver`: launch, adopt), probe (can Firecracker run here?). The config
models live in `arcbox_vm.config.firecracker`.
"""

from arcbox_vm.config.firecracker import FirecrackerConfig, JailerConfig

from .api import FirecrackerApi, parse_error_body
from .bodies import ApiRequest, BodyError
from .driver import FirecrackerDriver
from .probe import firecracker_usable
from .process import FirecrackerProcess

__all__ = [
    "ApiRequest",
    "BodyError",
    "FirecrackerApi",
    "FirecrackerConfig",
    "FirecrackerDriver",
    "FirecrackerProcess",
    "JailerConfig",
    "firecracker_usable",
    "parse_error_body",
]
