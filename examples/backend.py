"""An example backend: one instance of "your app" behind stickylb.

The application itself ships inside the package (``stickylb/demo/backend.py``) so that
``stickylb demo`` works from an installed wheel; read it there. This module is its command line:

    python -m examples.backend --name backend-1 --port 5001
"""

from stickylb.demo.backend import main, make_app

__all__ = ["main", "make_app"]

if __name__ == "__main__":
    main()
