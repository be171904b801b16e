"""Load tests under autoscaling: scenarios, an FC emulator, open-loop load and reports (python -m bench)."""
