"""Where training runs: the device's facts (detect), memory plans (plan). The session factory (execution
providers chosen at run time, checked after the session starts) lives in runtime/sessions.py; its names are
re-exported here. No torch here."""
from ..runtime.sessions import DEVICES, active_device, make_session, providers_for  # noqa: F401
