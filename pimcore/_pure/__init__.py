"""The pure-Python twin of ``pimcore._fastpath``: same API, same errors."""

from .codec import *  # noqa: F401,F403
from .codec import __all__ as _codec_all
from .fanout import *  # noqa: F401,F403
from .fanout import __all__ as _fanout_all
from .log import *  # noqa: F401,F403
from .log import __all__ as _log_all
from .order import *  # noqa: F401,F403
from .order import __all__ as _order_all
from .records import *  # noqa: F401,F403
from .records import __all__ as _records_all
from .send import *  # noqa: F401,F403
from .send import __all__ as _send_all
from .sync import *  # noqa: F401,F403
from .sync import __all__ as _sync_all

__all__ = [*_codec_all, *_order_all, *_fanout_all, *_records_all, *_send_all, *_log_all, *_sync_all]
