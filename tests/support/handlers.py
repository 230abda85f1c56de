"""The functions as Lambda loads them (shared with the embedded stack)."""

from fleetkey_local.functions import LambdaContext, load_function as load_handler

__all__ = ["LambdaContext", "load_handler"]
