"""The functions as Lambda loads them (shared with the embedded stack)."""

from fleetkey_local.functions import LambdaContext
from fleetkey_local.functions import load_function as load_handler

__all__ = ["LambdaContext", "load_handler"]
