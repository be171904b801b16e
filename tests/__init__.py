"""The sdfunc test suite (a package, so every tier imports its helpers as `tests.conftest` and `tests.support`)."""
