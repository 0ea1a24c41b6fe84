"""`python -m tests.support.fake_upstream`: gevent's monkey-patching first, before anything imports socket or ssl."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from .server import main  # noqa: E402

sys.exit(main())
