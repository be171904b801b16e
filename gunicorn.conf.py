"""gunicorn loads this file from the working directory: the function's settings live in the package."""

from handler.gunicorn_conf import *  # noqa: F401,F403
from handler.gunicorn_conf import child_exit, on_starting, post_fork, post_worker_init, when_ready  # noqa: F401
