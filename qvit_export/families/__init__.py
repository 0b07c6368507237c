"""Model families as registered adapters: one module per family (``base.py`` says what a family declares).

Adding a family is one module with a ``@register_family`` class and one line below.
"""
from .base import FAMILIES, Arg, Family, family_for_model, family_of, register_family, supported  # noqa: F401
from . import vit  # noqa: F401, I001  (the built-in families register themselves, in this order)
from . import swin  # noqa: F401
from . import eva  # noqa: F401
from . import swin_v2  # noqa: F401
