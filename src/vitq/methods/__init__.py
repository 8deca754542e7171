"""Quantization methods, one file each, registered by name. Importing this package registers them all."""

from vitq.methods import adalog as _adalog  # noqa: F401
from vitq.methods import adaround as _adaround  # noqa: F401
from vitq.methods import aphq_vit as _aphq_vit  # noqa: F401
from vitq.methods import brecq as _brecq  # noqa: F401
from vitq.methods import dopq_vit as _dopq_vit  # noqa: F401
from vitq.methods import erq as _erq  # noqa: F401
from vitq.methods import float as _float  # noqa: F401
from vitq.methods import fqvit as _fqvit  # noqa: F401
from vitq.methods import gptq as _gptq  # noqa: F401
from vitq.methods import is_vit as _is_vit  # noqa: F401
from vitq.methods import llm_fp4 as _llm_fp4  # noqa: F401
from vitq.methods import minmax as _minmax  # noqa: F401
from vitq.methods import noisyquant as _noisyquant  # noqa: F401
from vitq.methods import percentile as _percentile  # noqa: F401
from vitq.methods import ptq4vit as _ptq4vit  # noqa: F401
from vitq.methods import q_hyvit as _q_hyvit  # noqa: F401
from vitq.methods import qdrop as _qdrop  # noqa: F401
from vitq.methods import repq_vit as _repq_vit  # noqa: F401
from vitq.methods.base import Method, method_class, method_names, register_method

__all__ = ["Method", "method_class", "method_names", "register_method"]
