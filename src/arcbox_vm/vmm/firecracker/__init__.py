"""Firecracker VMM driver: config, API client, request bodies, process handling, KVM probe."""

from .api import FirecrackerApi, parse_error_body
from .bodies import ApiRequest, BodyError
from arcbox_vm.config.firecracker import FirecrackerConfig, JailerConfig
from .driver import FirecrackerDriver, FirecrackerProcess
from .probe import firecracker_usable

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
