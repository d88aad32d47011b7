"""The methods SemAlign is compared with, one module each. Importing the package imports every module in it, so a
method registers itself (``@register_method``) by living here: adding one is adding its module."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
